"""The action expert: a Qwen3-VL text decoder that reads the VLM's cached per-layer K/V.

The expert is a transformers ``Qwen3VLTextModel`` built from the VLM text config with the expert
overrides (REFERENCE §1), its token embedding deleted. Expert layer i attends to VLM layer i's cached
keys/values (post k-norm, post-RoPE) followed by the action tokens' own keys/values; an expert shallower
than the VLM (2 Super's layout) reads the first VLM layers.

Positions and masks follow the releases' inference path: the action tokens sit at rope_delta + L + 0..w-1
(L = one past <|traj_future_start|>) and see every valid prefix token. Samples are stored unpadded; a
batch is right-padded (``lengths`` masks the tail) or left-padded like the 1.5 release batches its
prompts (``key_mask`` masks the pads; rope_deltas and lengths are then in padded coordinates, which leaves
the positions unchanged, as the release's own rope_deltas fold the padding in).

Several flow-matching draws per prefix (training draws, best-of-K samples) are folded into the token
axis: n draws of w action tokens form one sequence of n*w tokens with the same positions per draw and a
block-diagonal mask, so the prefix K/V is read once and never copied n times.

We drive the decoder layers ourselves instead of calling ``Qwen3VLTextModel.forward`` because:
- the cached prefix must stay read-only (training recomputes layers under gradient checkpointing,
  and a mutating cache would grow on every recompute);
- transformers' own checkpointing drops ``past_key_values``, which is exactly the conditioning here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alpamayo_cache.config import ModelConfig, TextConfig
from alpamayo_cache.model.hf_compat import cache_argument
from alpamayo_cache.store.format import dequantize
from alpamayo_cache.store.quant import KVQuant

ATTENTION_MODES = ("bidirectional", "causal")


def hf_text_config(text: TextConfig, **overrides: object):
    """A transformers Qwen3VLTextConfig for our TextConfig (plus attribute overrides)."""
    from transformers import Qwen3VLTextConfig

    cfg = Qwen3VLTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        rope_scaling={
            "rope_type": "default",
            "mrope_section": list(text.mrope_section),
            "mrope_interleaved": True,
        },
        attention_bias=False,
        max_position_embeddings=262_144,
        tie_word_embeddings=False,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_expert(cfg: ModelConfig) -> nn.Module:
    """The expert decoder (no token embedding: its tokens come from action_in_proj)."""
    from transformers import Qwen3VLTextModel

    e = cfg.expert
    text = hf_text_config(
        cfg.text,
        hidden_size=e.hidden_size,
        intermediate_size=e.intermediate_size,
        num_attention_heads=e.num_heads,
        head_dim=e.head_dim,
        num_hidden_layers=cfg.expert_layers,
    )
    expert = Qwen3VLTextModel(text)
    del expert.embed_tokens
    return expert


@dataclass
class PromptStates:
    """What a ``--vlm-from-layer k`` store keeps so the VLM's layers k.. can be run again (vlm_top).

    hidden:       [b, t, D] hidden states entering text layer k, stored precision (right-padded)
    position_ids: [3, b, t] the prompt's MRoPE position ids
    mask:         [b, t] the prompt's attention mask, or None when it is all ones
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PromptStates:
        mask = None if self.mask is None else self.mask.to(device, non_blocking=True)
        return PromptStates(
            self.hidden.to(device, non_blocking=True), self.position_ids.to(device, non_blocking=True), mask
        )


@dataclass
class Prefix:
    """Cached VLM features for a batch, as the expert consumes them.

    keys, values: [l, b, h, t, d] in the stored precision (t = longest prefix; shorter ones right-padded;
                  int8/int4 codes, int4 packed to d/2)
    rope_deltas:  [b] MRoPE offset of each prompt (negative: images use fewer positions than tokens)
    lengths:      [b] prefix length L of each sample: one past its <|traj_future_start|>; keys from L on
                  are never attended
    kv_scale:     [b, l, 2] dequantisation scales of fp8 stores, else None
    key_mask:     [b, t] bool, False at padding inside [0, L) (left padding), else None
    quant:        int8/int4 stores' (scale, zero) arrays, else None
    prompt:       what recomputes layers l.. (``--vlm-from-layer`` stores; model/vlm_top.py), else None
    """

    keys: torch.Tensor
    values: torch.Tensor
    rope_deltas: torch.Tensor
    lengths: torch.Tensor
    kv_scale: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    quant: KVQuant | None = None
    prompt: PromptStates | None = None

    @classmethod
    def from_batch(cls, batch) -> Prefix:
        hidden = getattr(batch, "prompt_hidden", None)
        prompt = None if hidden is None else PromptStates(hidden, batch.position_ids, batch.prompt_mask)
        return cls(
            batch.keys,
            batch.values,
            batch.rope_deltas,
            batch.lengths,
            batch.kv_scale,
            getattr(batch, "key_mask", None),
            getattr(batch, "quant", None),
            prompt,
        )

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return int(self.keys.shape[-2])

    def to(self, device: torch.device | str) -> Prefix:
        """Moves the stored bytes (never converts them: dequantisation happens per layer on use)."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)

        return Prefix(
            move(self.keys),
            move(self.values),
            move(self.rope_deltas),
            move(self.lengths),
            move(self.kv_scale),
            move(self.key_mask),
            None if self.quant is None else self.quant.to(device),
            None if self.prompt is None else self.prompt.to(device),
        )  # type: ignore[arg-type]

    def layer(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of VLM layer ``index`` in ``dtype``, [b, h, t, d], on the prefix's device."""
        if index >= self.keys.shape[0]:
            raise RuntimeError(
                f"the prefix holds VLM layers 0..{self.keys.shape[0] - 1} only (a --vlm-from-layer store): "
                "wrap the policy with model.vlm_top so the layers above are recomputed"
            )
        if self.quant is not None:
            return self.quant.dequantize(index, self.keys[index], self.values[index], dtype)
        scale = None if self.kv_scale is None else self.kv_scale[:, index]
        k_scale = None if scale is None else scale[:, 0]
        v_scale = None if scale is None else scale[:, 1]
        return dequantize(self.keys[index], k_scale, dtype), dequantize(self.values[index], v_scale, dtype)

    def all_finite(self) -> bool:
        """No NaN/Inf in the cached features (checked on their device, cheaply)."""
        if self.kv_scale is not None and not bool(torch.isfinite(self.kv_scale).all()):
            return False
        if self.quant is not None:  # integer codes are always finite: only their scales can be damaged
            return self.quant.all_finite()
        tensors = [self.keys, self.values] + ([] if self.prompt is None else [self.prompt.hidden])
        return all(bool(torch.isfinite(x.float() if x.element_size() == 1 else x).all()) for x in tensors)


class _ReadOnlyPrefixCache:
    """Duck-typed transformers cache: layer i's attention sees [prefix K/V ; its own K/V]."""

    def __init__(self, prefix: Prefix) -> None:
        self.prefix = prefix

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        # Extra arguments (4.x: cache_kwargs; 5.x: kwargs=...) carry nothing this read-only cache needs.
        pk, pv = self.prefix.layer(layer_idx, key.dtype)
        return torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2)


def attention_mask(prefix: Prefix, draws: int, waypoints: int, mode: str) -> torch.Tensor | None:
    """Boolean mask [b, 1, n*w, t + n*w] (True = may attend): the valid prefix, and within each of the
    n draws its own w action tokens (all of them, or causally). None when every token may see
    everything (one draw, bidirectional, no padding): SDPA then runs its fused kernels."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    b, t = prefix.batch_size, prefix.width
    device = prefix.lengths.device
    unpadded = prefix.key_mask is None or bool(prefix.key_mask.all())
    if mode == "bidirectional" and draws == 1 and unpadded and bool((prefix.lengths == t).all()):
        return None
    n_tokens = draws * waypoints
    valid_prefix = torch.arange(t, device=device)[None, :] < prefix.lengths[:, None]  # [b, t]
    if prefix.key_mask is not None:
        valid_prefix = valid_prefix & prefix.key_mask.to(device=device, dtype=torch.bool)
    prefix_part = valid_prefix[:, None, :].expand(b, n_tokens, t)
    draw_of = torch.arange(n_tokens, device=device) // waypoints
    block = draw_of[:, None] == draw_of[None, :]
    if mode == "causal":
        block = block & torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril()
    return torch.cat([prefix_part, block[None].expand(b, n_tokens, n_tokens)], dim=-1)[:, None]


def action_position_ids(prefix: Prefix, draws: int, waypoints: int) -> torch.Tensor:
    """MRoPE positions [3, b, n*w] of the action tokens: rope_delta + L + 0..w-1 on all three axes,
    the same for each draw."""
    start = prefix.rope_deltas.long() + prefix.lengths.long()
    pos = start[:, None] + torch.arange(waypoints, device=start.device).repeat(draws)[None, :]
    return pos[None].expand(3, -1, -1)


def run_expert(
    expert: nn.Module,
    tokens: torch.Tensor,
    prefix: Prefix,
    draws: int,
    mode: str,
    checkpointing: bool,
) -> torch.Tensor:
    """Expert hidden states [b, n*w, hidden] for action tokens [b, n*w, hidden] over the prefix."""
    waypoints = tokens.shape[1] // draws
    positions = action_position_ids(prefix, draws, waypoints)
    mask = attention_mask(prefix, draws, waypoints, mode)
    t = prefix.width
    cache_position = torch.arange(t, t + tokens.shape[1], device=tokens.device)
    rope = expert.rotary_emb(tokens, positions)
    kwargs = {
        "attention_mask": mask,
        "position_ids": positions[0],
        cache_argument(expert.layers[0]): _ReadOnlyPrefixCache(prefix),
        "cache_position": cache_position,
        "position_embeddings": rope,
        "is_causal": False,  # any causality is in the explicit mask
    }
    hidden = tokens
    for layer in expert.layers:
        if checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(_run_layer, layer, hidden, kwargs, use_reentrant=False)
        else:
            hidden = _run_layer(layer, hidden, kwargs)
    return expert.norm(hidden)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
