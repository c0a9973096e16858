"""Optimizer and schedule: AdamW (fp32 states) or bitsandbytes 8-bit AdamW, cosine with warmup."""

from __future__ import annotations

import math

import torch

from alpamayo_cache.errors import UserError


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, betas: tuple[float, float]
):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'alpamayo-cache[gpu]'"
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise UserError(f"--optimizer must be adamw or adamw8bit, got {name!r}")


def resolve_optimizer(name: str, device: str) -> str:
    """auto: 8-bit AdamW on CUDA when bitsandbytes is installed, plain AdamW otherwise."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        try:
            import bitsandbytes  # noqa: F401

            return "adamw8bit"
        except ImportError:
            return "adamw"
    return "adamw"


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, lr: float, min_lr: float):
    """Linear warmup to lr, then cosine decay to min_lr at total_steps."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
