"""Training objectives: what one micro-batch's loss is. The loop calls ``objective.loss`` and logs the
extra numbers it returns next to the loss.

- ``fm``: flow matching towards the logged trajectory (the release's training objective), with
  ``--draws-per-sample`` (t, noise) draws per loaded prefix folded into one forward pass.
- ``awr``: fm plus advantage-weighted regression towards the best of K own samples (train/awr.py).

An objective with ``reads_front = True`` gets the front-camera images in its batches.
"""

from __future__ import annotations

from typing import Protocol

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.policy import draw_noise
from alpamayo_cache.store.dataset import Batch


class Objective(Protocol):
    def loss(
        self, model: torch.nn.Module, prefix: Prefix, batch: Batch, generator: torch.Generator, device: str
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class FlowMatching:
    """Mean squared velocity error towards the logged actions (noise and times from ``generator``)."""

    def __init__(self, draws: int = 1) -> None:
        self.draws = draws

    def loss(self, model, prefix: Prefix, batch: Batch, generator: torch.Generator, device: str):
        action = batch.action.to(device)
        t, noise = draw_noise(action.shape[0], self.draws, action.shape[1], generator)
        return model(prefix, action, t, noise), {}


def make_objective(cfg: TrainConfig) -> Objective:
    if cfg.objective == "fm":
        return FlowMatching(draws=cfg.draws_per_sample)
    if cfg.objective == "awr":
        from alpamayo_cache.train.awr import RewardWeighted

        return RewardWeighted(cfg)
    raise UserError(f"unknown --objective {cfg.objective!r}")


def check_store(cfg: TrainConfig, reader) -> None:
    """Refuse, before any work, a store the objective cannot train on."""
    if cfg.objective == "awr" and cfg.reward_w_safety > 0 and not reader.has_front_images:
        raise UserError(
            f"--objective awr scores visual safety on front-camera images, and {cfg.store} has none (made "
            "before they were stored): precompute a new store, or pass --reward-w-safety 0"
        )
