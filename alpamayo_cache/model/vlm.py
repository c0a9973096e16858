"""The frozen VLM: tokenizer, the Alpamayo-R1 prompt, image preprocessing, and one forward per sample.

Only ``precompute`` imports this module. The prompt is built token by token in the Qwen chat format
(REFERENCE §3):

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
    16 x (<|vision_start|> N x <|image_pad|> <|vision_end|>)
    <|traj_history_start|> 48 history tokens <|traj_history_end|>{USER_TEXT}<|im_end|>\\n
    <|im_start|>assistant\\n<|traj_future_start|>                      (traj-only)
    <|im_start|>assistant\\n<|cot_start|> ... sampled ... <|traj_future_start|>   (reasoning)

The cache handed to the expert ends just after ``<|traj_future_start|>`` (inclusive).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix, hf_text_config

SYSTEM = "You are a driving assistant that generates safe and accurate actions."
USER_TEXT = {
    "traj-only": "output the future trajectory.",
    "reasoning": "output the chain-of-thought reasoning of the driving process, then output the future trajectory.",
}
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
PROMPT_SPECIALS = [
    "<|traj_history_start|>",
    "<|traj_history_end|>",
    "<|traj_history|>",
    "<|traj_future_start|>",
    "<|cot_start|>",
]
HISTORY_TOKENS_PER_POSE = 3  # dx, dy, dz
# Delta tokenizer range for history steps (metres): x, y in [-4, 4], z in [-10, 10].
DELTA_MIN = np.array([-4.0, -4.0, -10.0])
DELTA_MAX = np.array([4.0, 4.0, 10.0])


def extend_tokenizer(tok, cfg: ModelConfig) -> None:
    """Add the trajectory tokens <i0>.. and then Alpamayo's special tokens, as the release does."""
    vocab = tok.get_vocab()
    if "<i0>" not in vocab:
        tok.add_tokens([f"<i{i}>" for i in range(cfg.traj_vocab_size)], special_tokens=True)
    missing = [t for t in ALPAMAYO_SPECIALS if t not in vocab]
    if missing:
        tok.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )


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
    _check_tokenizer(tok, cfg)
    return tok


def _check_tokenizer(tok, cfg: ModelConfig) -> None:
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
    """The tiny preset builds its tokenizer; a real model reads one from a local folder."""
    if cfg.name == "tiny":
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
    _check_tokenizer(tok, cfg)
    return tok


def history_token_bins(hist_xyz: np.ndarray, num_bins: int) -> np.ndarray:
    """Delta tokenizer: per-step xyz displacement (the first from the origin) -> bins [3 * t]."""
    xyz = np.asarray(hist_xyz, dtype=np.float32)
    steps = np.diff(np.concatenate([np.zeros((1, 3), np.float32), xyz]), axis=0)
    scaled = (steps - DELTA_MIN) / (DELTA_MAX - DELTA_MIN)
    bins = np.clip(np.round(scaled * (num_bins - 1)), 0, num_bins - 1).astype(np.int64)
    return bins.reshape(-1)


class PromptBuilder:
    def __init__(self, tokenizer, cfg: ModelConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS + PROMPT_SPECIALS}

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def build(self, tokens_per_image: list[int], hist_xyz: np.ndarray, mode: str) -> list[int]:
        s = self.ids
        ids = [s["<|im_start|>"], *self._text("system\n" + SYSTEM), s["<|im_end|>"], *self._text("\n")]
        ids += [s["<|im_start|>"], *self._text("user\n")]
        for n in tokens_per_image:
            ids += [s["<|vision_start|>"], *([s["<|image_pad|>"]] * n), s["<|vision_end|>"]]
        bins = history_token_bins(hist_xyz, self.cfg.hist_num_bins)
        hist_ids = (self.cfg.traj_token_start_idx + self.cfg.hist_token_offset + bins).tolist()
        ids += [s["<|traj_history_start|>"], *hist_ids, s["<|traj_history_end|>"]]
        ids += [*self._text(USER_TEXT[mode]), s["<|im_end|>"], *self._text("\n")]
        ids += [s["<|im_start|>"], *self._text("assistant\n")]
        ids.append(s["<|traj_future_start|>"] if mode == "traj-only" else s["<|cot_start|>"])
        return ids


def image_processor(cfg: ModelConfig):
    """Qwen-VL patchifier set so frames already at the model's size are not resized again."""
    from transformers import Qwen2VLImageProcessor

    h, w = cfg.image_size
    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    if h % factor or w % factor:
        raise UserError(f"image_size {cfg.image_size} must be a multiple of {factor} (patch x merge)")
    return Qwen2VLImageProcessor(
        min_pixels=h * w,
        max_pixels=h * w,
        patch_size=cfg.vision.patch_size,
        temporal_patch_size=cfg.vision.temporal_patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def hf_vlm_config(cfg: ModelConfig, tok_ids: dict[str, int]):
    from transformers import Qwen3VLConfig

    v = cfg.vision
    text = hf_text_config(cfg.text).to_dict()
    vision = {
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "out_hidden_size": cfg.text.hidden_size,
        "deepstack_visual_indexes": list(v.deepstack_layers),
        "num_position_embeddings": v.num_position_embeddings,
    }
    out = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok_ids["<|image_pad|>"],
        video_token_id=tok_ids["<|video_pad|>"],
        vision_start_token_id=tok_ids["<|vision_start|>"],
        vision_end_token_id=tok_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    out._attn_implementation = "sdpa"
    return out


def model_identity(cfg: ModelConfig, folder: Path | None) -> str:
    """What weights the VLM has: preset + seed, or a hash of the checkpoint's file names and sizes."""
    if folder is None:
        return f"preset:{cfg.name}:seed{cfg.init_seed}"
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.json")) + sorted(Path(folder).glob("*.safetensors")):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return f"folder:{h.hexdigest()[:16]}"


def build_vlm(
    cfg: ModelConfig, tok_ids: dict[str, int], folder: Path | None, dtype: torch.dtype, device: str
):
    """The VLM with seeded random weights (preset) or the ``vlm.*`` weights of a released folder."""
    from transformers import Qwen3VLForConditionalGeneration

    hf_cfg = hf_vlm_config(cfg, tok_ids)
    if folder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = Qwen3VLForConditionalGeneration(hf_cfg)
    else:
        # transformers' own loader builds on the meta device and fills weights and RoPE buffers.
        tensors = _read_vlm_tensors(Path(folder))
        model, loading = Qwen3VLForConditionalGeneration.from_pretrained(
            None, config=hf_cfg, state_dict=tensors, dtype=dtype, output_loading_info=True
        )
        del tensors
        for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
            problems = sorted(map(str, loading.get(kind) or []))
            if problems:
                what = kind.replace("_", " ")[:-1]
                raise UserError(
                    f"{folder}: VLM {what} {problems[0]} ({len(problems)} in all): checkpoint of another architecture"
                )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _read_vlm_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise UserError(f"{folder} has no model.safetensors.index.json: not a sharded Alpamayo-R1 checkpoint")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if key.startswith("vlm."):
            by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        with safe_open(folder / shard, "pt") as f:
            for key in keys:
                out[key[len("vlm.") :]] = f.get_tensor(key)
    return out


@dataclass
class EncodedPrefix:
    """One sample's conditioning. keys/values: [l, h, L, d]; hidden: [D]."""

    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor
    rope_delta: int
    length: int
    reasoning: str = ""


def stack_prefixes(encoded: list[EncodedPrefix]) -> Prefix:
    """Batch freshly encoded prefixes of equal length the way the store's collate does."""
    return Prefix(
        keys=torch.stack([e.keys for e in encoded], dim=1),
        values=torch.stack([e.values for e in encoded], dim=1),
        rope_deltas=torch.tensor([e.rope_delta for e in encoded]),
        lengths=torch.tensor([e.length for e in encoded]),
    )


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


class FrozenVLM:
    """Runs the VLM once per sample under no_grad and returns the expert's conditioning."""

    def __init__(
        self,
        cfg: ModelConfig,
        folder: Path | None,
        tokenizer_folder: Path | None,
        device: str,
        dtype: torch.dtype,
    ):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.tokenizer = load_tokenizer(cfg, tokenizer_folder or folder)
        self.prompt = PromptBuilder(self.tokenizer, cfg)
        self.processor = image_processor(cfg)
        self.model = build_vlm(cfg, self.prompt.ids, folder, dtype, device)
        self.identity = model_identity(cfg, folder)

    @torch.no_grad()
    def encode(
        self,
        images: np.ndarray,
        hist_xyz: np.ndarray,
        mode: str,
        seed: int = 0,
        max_reasoning_tokens: int = 64,
    ) -> EncodedPrefix:
        """images: uint8 [c, f, H, W, 3] at the model's size (camera-major); hist_xyz: [16, 3]."""
        frames = images.reshape(-1, *images.shape[-3:])
        proc = self.processor(images=list(frames), return_tensors="pt")
        grid = proc["image_grid_thw"]
        per_image = (grid.prod(-1) // self.cfg.vision.spatial_merge_size**2).tolist()
        ids = torch.tensor([self.prompt.build(per_image, hist_xyz, mode)], device=self.device)
        pixels = proc["pixel_values"].to(self.device, self.dtype)
        grid = grid.to(self.device)
        reasoning = ""
        if mode == "reasoning":
            ids, reasoning = self._reason(ids, pixels, grid, seed, max_reasoning_tokens)
        mask = torch.ones_like(ids)
        position_ids, rope_deltas = self.model.model.get_rope_index(ids, grid, None, attention_mask=mask)
        out = self.model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            pixel_values=pixels,
            image_grid_thw=grid,
            use_cache=True,
        )
        layers = [_layer_kv(out.past_key_values, i) for i in range(self.cfg.text.num_layers)]
        keys = torch.stack([k[0] for k, _ in layers])
        values = torch.stack([v[0] for _, v in layers])
        return EncodedPrefix(
            keys=keys,
            values=values,
            hidden=out.last_hidden_state[0, -1].float(),
            rope_delta=int(rope_deltas.reshape(-1)[0]),
            length=int(ids.shape[1]),
            reasoning=reasoning,
        )

    def _reason(self, ids, pixels, grid, seed: int, max_new: int) -> tuple[torch.Tensor, str]:
        """Sample chain-of-causation text (top_p 0.98, T 0.6) until <|traj_future_start|>."""
        stop = self.prompt.ids["<|traj_future_start|>"]
        traj = range(self.cfg.traj_token_start_idx, self.cfg.traj_token_start_idx + self.cfg.traj_vocab_size)
        cuda = [] if self.device == "cpu" else [torch.device(self.device).index or 0]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                image_grid_thw=grid,
                max_new_tokens=max_new,
                do_sample=True,
                top_p=0.98,
                temperature=0.6,
                eos_token_id=stop,
                pad_token_id=self.prompt.ids["<|endoftext|>"],
                suppress_tokens=list(traj),  # discrete trajectory tokens are not text
            )
        new = out[0, ids.shape[1] :].tolist()
        if stop in new:
            new = new[: new.index(stop)]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        full = torch.tensor([ids[0].tolist() + new + [stop]], device=ids.device)
        return full, text
