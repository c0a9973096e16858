"""The trajectory policy: action_in_proj -> expert over the cached prefix -> action_out_proj, and the
flow-matching maths that trains it (``forward`` = the loss) and samples from it (``sample``).

Module names follow the released checkpoint (``expert.*``, ``action_in_proj.*``, ``action_out_proj.*``),
so released weights load as they are. Shapes: b samples, n draws per sample, w waypoints.
"""

from __future__ import annotations

import torch
from torch import nn

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.model import flow_matching as fm
from alpamayo_cache.model.action_proj import ActionInProj, action_out_proj
from alpamayo_cache.model.expert import ATTENTION_MODES, Prefix, build_expert, run_expert


def draw_noise(
    batch: int, draws: int, waypoints: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching timesteps [b, n] and noise [b, n, w, 2], drawn on the CPU from ``generator`` so a
    run is reproducible on any device and after a resume."""
    t = fm.sample_timesteps(batch * draws, generator).reshape(batch, draws)
    noise = torch.randn((batch, draws, waypoints, 2), generator=generator)
    return t, noise


class Policy(nn.Module):
    """expert + action_in_proj + action_out_proj, with the released checkpoint's key names."""

    def __init__(self, cfg: ModelConfig, attention: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or ("bidirectional" if cfg.expert_non_causal_attention else "causal")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}")
        self.expert = build_expert(cfg)
        hidden = cfg.expert.hidden_size
        self.action_in_proj = ActionInProj(cfg.action_in_proj, action_dims=2, out_dim=hidden)
        self.action_out_proj = action_out_proj(hidden)
        self.gradient_checkpointing = False

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """Velocity [b, n, w, 2] of n noisy action sequences per sample [b, n, w, 2] at times [b, n]."""
        b, n, w, dims = noisy.shape
        tokens = self.action_in_proj(noisy.reshape(b * n, w, dims), timesteps.reshape(b * n, 1, 1))
        tokens = tokens.reshape(b, n * w, -1)
        checkpointing = self.gradient_checkpointing and self.training
        hidden = run_expert(self.expert, tokens, prefix, n, self.attention, checkpointing)
        return self.action_out_proj(hidden).float().reshape(b, n, w, dims)

    def forward(
        self,
        prefix: Prefix,
        action: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching loss: mean squared velocity error over n draws per sample.

        action [b, w, 2] (or [b, n, w, 2] targets per draw), timesteps [b, n], noise [b, n, w, 2];
        ``weights`` [b, n] turns the mean into a weighted mean (reward-weighted objectives)."""
        b, n = timesteps.shape
        x = action if action.dim() == 4 else action[:, None].expand(b, n, *action.shape[1:])
        pair = fm.make_pair(x, timesteps=timesteps.to(x.device), noise=noise.to(x.device))
        pred = self.velocity(pair.noisy_x, pair.timesteps.reshape(b, n), prefix)
        per_draw = ((pred - pair.target.to(pred.dtype)) ** 2).mean(dim=(2, 3))  # [b, n]
        if weights is None:
            return per_draw.mean()
        weights = weights.to(per_draw.device, per_draw.dtype)
        return (per_draw * weights).sum() / weights.sum().clamp_min(1e-12)

    @torch.no_grad()
    def sample(
        self,
        prefix: Prefix,
        noise: torch.Tensor,
        num_steps: int = 10,
        uncond: Prefix | None = None,
        guidance: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised actions [b, k, w, 2]: Euler integration from noise [b, k, w, 2] at t=0 to t=1.

        With ``uncond`` (the same samples' prefixes without their route) and a guidance weight w (a
        number, or one per sample [b]), each step uses v = (1 - w) v_uncond + w v_cond (classifier-free
        guidance, as Alpamayo 1.5 samples)."""
        b, k = noise.shape[:2]
        guided = uncond is not None and guidance is not None
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(noise.device, torch.float32).reshape(b, 1, 1, 1)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            times = t.reshape(b, -1)[:, :1].expand(b, k)
            v_cond = self.velocity(x, times, prefix)
            if not guided:
                return v_cond
            v_uncond = self.velocity(x, times, uncond)
            return (1.0 - guidance) * v_uncond + guidance * v_cond

        return fm.euler_sample(velocity, noise, num_steps)
