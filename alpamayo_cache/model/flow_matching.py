"""Flow matching on the normalised action sequence (REFERENCE §1).

Convention: t = 0 is pure noise, t = 1 is data; x_t = t * x + (1 - t) * eps and the model predicts the
velocity v = x - eps. Training draws t = 0.999 * (1 - s) with s ~ Beta(1.5, 1), which puts more
samples near the noisy end. Sampling integrates dx/dt = v with explicit Euler steps t_k = k / n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BETA_SCALE = 0.999

# A velocity function: (x_t [b, w, 2], t [b, 1, 1]) -> v [b, w, 2]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainingPair:
    x: torch.Tensor  # clean actions [b, w, 2]
    noise: torch.Tensor  # eps [b, w, 2]
    timesteps: torch.Tensor  # t [b, 1, 1]
    noisy_x: torch.Tensor  # x_t [b, w, 2]

    @property
    def target(self) -> torch.Tensor:
        return self.x - self.noise


def sample_timesteps(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t = 0.999 * (1 - s), s ~ Beta(1.5, 1), drawn with ``generator`` so runs are reproducible."""
    # Beta(a, 1) has CDF s^a, so s = u^(1/a) for uniform u: exact and seedable with a Generator.
    u = torch.rand(batch, generator=generator)
    s = u ** (1.0 / 1.5)
    return BETA_SCALE - s * BETA_SCALE


def make_pair(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> TrainingPair:
    """Build (x_t, t, target) for clean actions ``x`` [b, (n,) w, 2]; t ([b] or [b, n]) and eps may
    be given."""
    if timesteps is None:
        timesteps = sample_timesteps(x.shape[0], generator).to(x.device)
    while timesteps.dim() < x.dim():  # [b] or [b, n] -> broadcast over waypoints and action dims
        timesteps = timesteps.unsqueeze(-1)
    timesteps = timesteps.to(x.dtype)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    noisy = timesteps * x + (1 - timesteps) * noise
    return TrainingPair(x=x, noise=noise, timesteps=timesteps, noisy_x=noisy)


def loss(pair: TrainingPair, pred: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity."""
    return F.mse_loss(pred, pair.target.to(pred.dtype))


@torch.no_grad()
def euler_sample(velocity: VelocityFn, init_noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
    """Integrate from noise at t=0 to data at t=1 with ``num_steps`` Euler steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = init_noise
    grid = torch.linspace(0.0, 1.0, num_steps + 1, device=x.device)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    for k in range(num_steps):
        t = grid[k].expand(shape)
        dt = grid[k + 1] - grid[k]
        x = x + dt * velocity(x, t)
    return x
