"""The tokenizer: Qwen's, extended the way the release extends it (trajectory tokens, then Alpamayo's
special tokens, in id order). The history trajectory's own tokens are in ``history_tokens``."""

from __future__ import annotations

from pathlib import Path

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.hf_compat import add_special_tokens

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The 28 special tokens Alpamayo-R1 appends after its 4,000 trajectory tokens, in id order
# (151,669 + 4,000 + 28 = the released vocabulary of 155,697). Their order fixes their ids.
ALPAMAYO_SPECIALS = [
    f"<|{name}|>"
    for name in (
        "prompt_start", "prompt_end", "image_start", "image_pre_tkn", "image_end", "traj_history_start",
        "traj_history_pre_tkn", "traj_history_end", "cot_start", "cot_end", "meta_action_start", "meta_action_end",
        "traj_future_start", "traj_future_pre_tkn", "traj_future_end", "traj_history", "traj_future",
        "vectorized_wm", "vectorized_wm_start", "vectorized_wm_end", "vectorized_wm_pre_tkn", "route_start",
        "route_pad", "route_end", "question_start", "question_end", "answer_start", "answer_end",
    )
]  # fmt: skip


def extend_tokenizer(tok, cfg: ModelConfig) -> None:
    """Add the trajectory tokens <i0>.. and then Alpamayo's special tokens, as the release does."""
    vocab = tok.get_vocab()
    if "<i0>" not in vocab:
        tok.add_tokens([f"<i{i}>" for i in range(cfg.traj_vocab_size)], special_tokens=True)
    missing = [t for t in ALPAMAYO_SPECIALS if t not in vocab]
    if missing:
        add_special_tokens(tok, missing)


def build_tiny_tokenizer(cfg: ModelConfig):
    """A byte-level tokenizer built offline: 256 bytes, Qwen's special tokens, then the release's
    extension (trajectory tokens, Alpamayo special tokens) in the release's order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    extend_tokenizer(tok, cfg)
    check_tokenizer(tok, cfg)
    return tok


def check_tokenizer(tok, cfg: ModelConfig) -> None:
    first = tok.convert_tokens_to_ids("<i0>")
    if first != cfg.traj_token_start_idx:
        raise UserError(
            f"tokenizer puts <i0> at id {first}, the model expects {cfg.traj_token_start_idx}: wrong tokenizer for this checkpoint"
        )
    if len(tok) > cfg.text.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens, more than the model's vocabulary {cfg.text.vocab_size}"
        )


def load_tokenizer(cfg: ModelConfig, folder: Path | None):
    """A toy preset builds its tokenizer; a real model reads one from a local folder."""
    if cfg.toy:
        return build_tiny_tokenizer(cfg)
    if folder is None or not (Path(folder) / "tokenizer_config.json").is_file():
        raise UserError(
            f"no tokenizer files in {folder}: pass --tokenizer <local Qwen3-VL-8B/Alpamayo tokenizer folder>"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    missing = [t for t in QWEN_SPECIALS if t not in tok.get_vocab()]
    if missing:
        raise UserError(f"tokenizer in {folder} lacks {missing[0]}: it is not a Qwen3-VL tokenizer")
    extend_tokenizer(tok, cfg)
    check_tokenizer(tok, cfg)
    return tok
