"""The frozen VLM: built from a preset (seeded weights) or a release folder's ``vlm.*`` shards, run once
per sample under no_grad to produce the expert's conditioning (per-layer K/V, last hidden state).

Only ``precompute`` imports this module. The prompt and its pixels come from ``prompt``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix, hf_text_config
from alpamayo_cache.model.hf_compat import layer_kv, multimodal_inputs, output_cache, seeded_init
from alpamayo_cache.model.prompt import PromptBuilder, image_inputs
from alpamayo_cache.model.tokenizer import load_tokenizer
from alpamayo_cache.model.weights import read_tensors


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
        seeded_init(model, cfg.init_seed)  # the same weights under every transformers version
    else:
        # transformers' own loader builds on the meta device and fills weights and RoPE buffers.
        tensors = read_tensors(Path(folder), lambda key: key.startswith("vlm."), strip="vlm.")
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


@dataclass
class EncodedPrefix:
    """One sample's conditioning. keys/values: [l, h, L, d] (every layer); hidden: [D].

    A routed sample also carries ``uncond``: the same sample encoded from the prompt without its route
    (the same reasoning replayed on top), whose first ``route_start`` tokens equal the guided ones.

    With ``from_layer`` k (FrozenVLM): prompt_hidden [L, D] = the hidden states entering text layer k
    (prompt_hidden_layer = k), position_ids [3, L] = the prompt's MRoPE ids, mask [L] = its attention
    mask (all ones here: stored only when it is not)."""

    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor
    rope_delta: int
    length: int
    reasoning: str = ""
    prompt_hidden: torch.Tensor | None = None
    prompt_hidden_layer: int | None = None
    position_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    uncond: EncodedPrefix | None = None
    route_start: int = -1


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts share (before the route's first token)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def stack_prefixes(encoded: list[EncodedPrefix]) -> Prefix:
    """Batch freshly encoded prefixes of equal length the way the store's collate does."""
    return Prefix(
        keys=torch.stack([e.keys for e in encoded], dim=1),
        values=torch.stack([e.values for e in encoded], dim=1),
        rope_deltas=torch.tensor([e.rope_delta for e in encoded]),
        lengths=torch.tensor([e.length for e in encoded]),
    )


class FrozenVLM:
    """Runs the VLM once per sample under no_grad and returns the expert's conditioning."""

    def __init__(
        self,
        cfg: ModelConfig,
        folder: Path | None,
        tokenizer_folder: Path | None,
        device: str,
        dtype: torch.dtype,
        from_layer: int | None = None,
    ):
        if from_layer is not None:
            from alpamayo_cache.model.vlm_top import check_first_layer

            check_first_layer(cfg, from_layer)
        self.from_layer = from_layer
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.tokenizer = load_tokenizer(cfg, tokenizer_folder or folder)
        self.prompt = PromptBuilder(self.tokenizer, cfg)
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
        camera_ids: list[int] | None = None,
        route: str | None = None,
    ) -> EncodedPrefix:
        """images: uint8 [c, f, H, W, 3] at the model's size (camera-major); hist_xyz: [16, 3];
        camera_ids: the release ids of the c cameras (labelled prompts); route: navigation text or None.

        With a route the prompt is encoded twice, as Alpamayo 1.5's guided sampling does: with the route
        (reasoning sampled there) and without it (the same reasoning tokens replayed on top)."""
        values, grid, per_image = image_inputs(images, self.cfg)
        ids = self.prompt.build(per_image, hist_xyz, mode, camera_ids, route)
        pixels = values.to(self.device, self.dtype)
        grid = grid.to(self.device)
        reasoning, generated = "", []
        if mode == "reasoning":
            generated, reasoning = self._reason(ids, pixels, grid, seed, max_reasoning_tokens)
        out = self._prefill(ids + generated, pixels, grid)
        out.reasoning = reasoning
        if route:
            plain = self.prompt.build(per_image, hist_xyz, mode, camera_ids, None) + generated
            out.uncond = self._prefill(plain, pixels, grid)
            out.route_start = shared_length(ids + generated, plain)
        return out

    def _prefill(self, token_ids: list[int], pixels: torch.Tensor, grid: torch.Tensor) -> EncodedPrefix:
        """One forward over the whole prompt: per-layer K/V, last hidden state, MRoPE delta."""
        ids = torch.tensor([token_ids], device=self.device)
        mask = torch.ones_like(ids)
        mm = multimodal_inputs(self.model.model, ids, self.prompt.ids["<|image_pad|>"])
        position_ids, rope_deltas = self.model.model.get_rope_index(
            ids, image_grid_thw=grid, attention_mask=mask, **mm
        )
        captured: list[torch.Tensor] = []
        hook = None
        if self.from_layer is not None:
            # The hidden states as decoder layer k receives them (deepstack features already added).
            layer = self.model.model.language_model.layers[self.from_layer]
            hook = layer.register_forward_pre_hook(
                lambda _m, args, kwargs: captured.append(
                    (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
                ),
                with_kwargs=True,
            )
        try:
            out = self.model.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                pixel_values=pixels,
                image_grid_thw=grid,
                use_cache=True,
            )
        finally:
            if hook is not None:
                hook.remove()
        layers = [layer_kv(output_cache(out), i) for i in range(self.cfg.text.num_layers)]
        return EncodedPrefix(
            keys=torch.stack([k[0] for k, _ in layers]),
            values=torch.stack([v[0] for _, v in layers]),
            hidden=out.last_hidden_state[0, -1].float(),
            rope_delta=int(rope_deltas.reshape(-1)[0]),
            length=int(ids.shape[1]),
            prompt_hidden=captured[0] if captured else None,
            prompt_hidden_layer=self.from_layer,
            position_ids=position_ids[:, 0] if captured else None,
            mask=mask[0] if captured else None,
        )

    def _reason(self, prompt: list[int], pixels, grid, seed: int, max_new: int) -> tuple[list[int], str]:
        """Sample chain-of-causation text (top_p 0.98, T 0.6) until <|traj_future_start|>: the tokens
        generated (ending with it) and their text."""
        stop = self.prompt.ids["<|traj_future_start|>"]
        traj = range(self.cfg.traj_token_start_idx, self.cfg.traj_token_start_idx + self.cfg.traj_vocab_size)
        cuda = [] if self.device == "cpu" else [torch.device(self.device).index or 0]
        ids = torch.tensor([prompt], device=self.device)
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
                **multimodal_inputs(self.model.model, ids, self.prompt.ids["<|image_pad|>"]),
            )
        new = out[0, ids.shape[1] :].tolist()
        if stop in new:
            new = new[: new.index(stop)]
        return new + [stop], self.tokenizer.decode(new, skip_special_tokens=False)
