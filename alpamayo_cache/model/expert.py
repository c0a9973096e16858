"""The action expert and the trajectory head (action_in_proj -> expert -> action_out_proj).

The expert is a transformers ``Qwen3VLTextModel`` built from the VLM text config with the expert
overrides (REFERENCE §1), its token embedding deleted. Expert layer i attends to VLM layer i's cached
keys/values (post k-norm, post-RoPE) followed by the 64 action tokens' own keys/values.

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
from alpamayo_cache.model.action_proj import ActionInProj, action_out_proj

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


def expert_text_config(cfg: ModelConfig):
    e = cfg.expert
    return hf_text_config(
        cfg.text,
        hidden_size=e.hidden_size,
        intermediate_size=e.intermediate_size,
        num_attention_heads=e.num_heads,
        head_dim=e.head_dim,
    )


@dataclass
class Prefix:
    """Cached VLM features for a batch, as the expert consumes them.

    keys, values: [l, b, h, t, d] (t = longest prefix in the batch; shorter ones are right-padded)
    rope_deltas:  [b] MRoPE offset of each prompt (negative: images use fewer positions than tokens)
    lengths:      [b] true prefix length L of each sample
    """

    keys: torch.Tensor
    values: torch.Tensor
    rope_deltas: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Prefix:
        return Prefix(
            keys=self.keys.to(device=device, dtype=dtype, non_blocking=True),
            values=self.values.to(device=device, dtype=dtype, non_blocking=True),
            rope_deltas=self.rope_deltas.to(device),
            lengths=self.lengths.to(device),
        )

    def repeat(self, n: int) -> Prefix:
        """Each sample n times in a row (b -> b*n), for drawing several trajectories per sample."""
        return Prefix(
            keys=self.keys.repeat_interleave(n, dim=1),
            values=self.values.repeat_interleave(n, dim=1),
            rope_deltas=self.rope_deltas.repeat_interleave(n),
            lengths=self.lengths.repeat_interleave(n),
        )


class _ReadOnlyPrefixCache:
    """Duck-typed transformers cache: layer i's attention sees [prefix K/V ; its own K/V]."""

    def __init__(self, prefix: Prefix) -> None:
        self.prefix = prefix

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: object = None):
        pk = self.prefix.keys[layer_idx].to(key.dtype)
        pv = self.prefix.values[layer_idx].to(value.dtype)
        return torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2)


def attention_mask(prefix: Prefix, n_tokens: int, mode: str) -> torch.Tensor | None:
    """Boolean mask [b, 1, w, t + w] (True = may attend): valid prefix + action block.

    None when every token may see everything (bidirectional, no padding): SDPA then runs its fused
    kernels with native grouped-query attention instead of materialising repeated K/V heads.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    b = prefix.lengths.shape[0]
    t = prefix.keys.shape[-2]
    if mode == "bidirectional" and bool((prefix.lengths == t).all()):
        return None
    device = prefix.keys.device
    valid_prefix = torch.arange(t, device=device)[None, :] < prefix.lengths[:, None]  # [b, t]
    prefix_part = valid_prefix[:, None, :].expand(b, n_tokens, t)
    if mode == "causal":
        block = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril()
    else:
        block = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device)
    block = block[None].expand(b, n_tokens, n_tokens)
    return torch.cat([prefix_part, block], dim=-1)[:, None]


def action_position_ids(prefix: Prefix, n_tokens: int) -> torch.Tensor:
    """MRoPE positions [3, b, w] of the action tokens: rope_delta + L + 0..w-1 on all three axes."""
    start = prefix.rope_deltas.long() + prefix.lengths.long()
    pos = start[:, None] + torch.arange(n_tokens, device=start.device)[None, :]
    return pos[None].expand(3, -1, -1)


class TrajectoryHead(nn.Module):
    """expert + action_in_proj + action_out_proj, with the released checkpoint's key names."""

    def __init__(self, cfg: ModelConfig, attention: str | None = None) -> None:
        super().__init__()
        from transformers import Qwen3VLTextModel

        self.cfg = cfg
        self.attention = attention or ("bidirectional" if cfg.expert_non_causal_attention else "causal")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}")
        self.expert = Qwen3VLTextModel(expert_text_config(cfg))
        del self.expert.embed_tokens  # action tokens come from action_in_proj, never from ids
        hidden = cfg.expert.hidden_size
        self.action_in_proj = ActionInProj(cfg.action_in_proj, action_dims=2, out_dim=hidden)
        self.action_out_proj = action_out_proj(hidden)
        self.gradient_checkpointing = False

    def forward(self, noisy_action: torch.Tensor, timestep: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """Velocity [b, w, 2] for noisy actions [b, w, 2] at flow time [b, 1, 1]."""
        w = noisy_action.shape[1]
        tokens = self.action_in_proj(noisy_action, timestep)  # [b, w, hidden]
        positions = action_position_ids(prefix, w)
        mask = attention_mask(prefix, w, self.attention)
        t = prefix.keys.shape[-2]
        cache_position = torch.arange(t, t + w, device=tokens.device)
        rope = self.expert.rotary_emb(tokens, positions)
        cache = _ReadOnlyPrefixCache(prefix)
        hidden = tokens
        for layer in self.expert.layers:
            kwargs = dict(
                attention_mask=mask,
                position_ids=positions[0],
                past_key_values=cache,
                cache_position=cache_position,
                position_embeddings=rope,
                is_causal=False,  # any causality is in the explicit mask
            )
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(_run_layer, layer, hidden, kwargs, use_reentrant=False)
            else:
                hidden = _run_layer(layer, hidden, kwargs)
        hidden = self.expert.norm(hidden)
        return self.action_out_proj(hidden).float()

    def trainable_groups(self) -> dict[str, nn.Module]:
        return {
            "expert": self.expert,
            "action_in_proj": self.action_in_proj,
            "action_out_proj": self.action_out_proj,
        }


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
