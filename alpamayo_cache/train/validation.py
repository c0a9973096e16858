"""Validation loss: the flow-matching loss on the validation split with fixed noise and timesteps, so
values are comparable across steps and runs. A damaged validation sample is skipped with a warning
(training goes on and checkpoints); it is named so ``repair`` can deal with it."""

from __future__ import annotations

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.policy import Policy, draw_noise
from alpamayo_cache.runtime import autocast, log
from alpamayo_cache.store.dataset import CachedFeatures, collate, epoch_batches
from alpamayo_cache.store.format import CorruptSample

VAL_SEED = 12345


def _readable(dataset: CachedFeatures, indices: list[int], skipped: set[str]) -> list:
    samples = []
    for i in indices:
        sample_id = dataset.sample_ids[i]
        if sample_id in skipped:
            continue
        try:
            samples.append(dataset[i])
        except CorruptSample as exc:
            skipped.add(sample_id)
            log.warning(f"validation skips {sample_id}: {exc}")
    return samples


@torch.no_grad()
def validation_loss(
    policy: Policy, dataset: CachedFeatures, cfg: TrainConfig, device: str, dtype: torch.dtype
) -> float:
    """Mean loss over the split (``cfg.val_draws`` fixed draws per sample); NaN if nothing was readable."""
    policy.eval()
    skipped: set[str] = getattr(dataset, "skipped", set())
    dataset.skipped = skipped  # type: ignore[attr-defined]  # remembered across validations
    g = torch.Generator().manual_seed(VAL_SEED)
    total, count = 0.0, 0
    for idx in epoch_batches(dataset.lengths, cfg.micro_batch, seed=0, epoch=0, shuffle=False):
        samples = _readable(dataset, idx, skipped)
        t, noise = draw_noise(len(idx), cfg.val_draws, samples[0].action.shape[0] if samples else 64, g)
        if not samples:
            continue
        batch = collate(samples)
        keep = [k for k, i in enumerate(idx) if dataset.sample_ids[i] not in skipped]
        prefix = Prefix.from_batch(batch).to(device)
        with autocast(device, dtype):
            loss = policy(prefix, batch.action.to(device), t[keep], noise[keep])
        total += loss.item() * len(samples)
        count += len(samples)
    return total / count if count else float("nan")
