"""``action_in_proj`` (noisy action + timestep -> expert tokens) and ``action_out_proj``.

Module and parameter names follow the released checkpoint so its ``action_in_proj.*`` keys load as-is:
``sinus.{i}.freqs``, ``timestep_fourier_encoder.freqs``, ``encoder.trunk.{k}``, ``norm``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alpamayo_cache.config import ActionInProjConfig


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 (eps 1e-5 inside the action MLP)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FourierFeatures(nn.Module):
    """sin/cos of 2*pi*f*x for log-spaced f in [1, max_freq], scaled by sqrt(2); [...] -> [..., dim]."""

    def __init__(self, dim: int, max_freq: float, freqs_dtype: str = "fp32") -> None:
        super().__init__()
        self.out_dim = dim
        freqs = torch.logspace(0, math.log10(max_freq), steps=dim // 2)
        if freqs_dtype == "bf16":  # the values a bf16 load leaves (the products stay fp32)
            freqs = freqs.to(torch.bfloat16).float()
        self.register_buffer("freqs", freqs[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = x[..., None] * self.freqs * 2 * math.pi
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1) * math.sqrt(2)


def _mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """Linear, SiLU, then (RMSNorm, Linear, SiLU) x (num_layers - 1), ending in RMSNorm, Linear(out)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.SiLU()]
    for i in range(num_layers):
        last = i == num_layers - 1
        layers += [RMSNorm(hidden), nn.Linear(hidden, out_dim if last else hidden)]
        if not last:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    def __init__(self, trunk: nn.Sequential) -> None:
        super().__init__()
        self.trunk = trunk


class ActionInProj(nn.Module):
    """Per-waypoint projection: [b, w, 2] actions and [b, 1, 1] timesteps -> [b, w, hidden]."""

    def __init__(self, cfg: ActionInProjConfig, action_dims: int, out_dim: int) -> None:
        super().__init__()
        feats = cfg.num_fourier_feats
        self.sinus = nn.ModuleList(
            FourierFeatures(feats, cfg.max_freq, cfg.freqs_dtype) for _ in range(action_dims)
        )
        self.timestep_fourier_encoder = FourierFeatures(feats, cfg.max_freq, cfg.freqs_dtype)
        in_dim = feats * (action_dims + 1)
        self.encoder = _Encoder(_mlp(in_dim, cfg.hidden_size, out_dim, cfg.num_enc_layers))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b, w, _ = actions.shape
        actions, timesteps = actions.float(), timesteps.float()
        action_feats = torch.cat([enc(actions[:, :, i]) for i, enc in enumerate(self.sinus)], dim=-1)
        # The timestep's last axis is the one encoded; it is shared by every waypoint.
        time_feats = self.timestep_fourier_encoder(timesteps.reshape(b, -1)[:, -1:]).expand(b, w, -1)
        feats = torch.cat([action_feats, time_feats], dim=-1)
        weight_dtype = self.norm.weight.dtype
        return self.norm(self.encoder.trunk(feats.to(weight_dtype)))


def action_out_proj(hidden: int, action_dims: int = 2) -> nn.Linear:
    """Expert hidden state -> velocity per waypoint."""
    return nn.Linear(hidden, action_dims)
