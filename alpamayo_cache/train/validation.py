"""Validation loss: the flow-matching loss on the validation split with fixed noise and timesteps, so
values are comparable across steps and runs. A damaged validation sample is skipped with a warning
(training goes on and checkpoints); it is named so ``repair`` can deal with it. Batches are read through
``CachedFeatures.read_batch`` (the training feed's reading function) into a one-slot ring kept on the
dataset between validations."""

from __future__ import annotations

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.policy import Policy, draw_noise
from alpamayo_cache.runtime import autocast, log
from alpamayo_cache.store.dataset import Batch, CachedFeatures, epoch_batches
from alpamayo_cache.store.fast_read import BatchReader
from alpamayo_cache.store.format import CorruptSample

VAL_SEED = 12345


def _read(
    dataset: CachedFeatures, reader: BatchReader, indices: list[int], skipped: set[str]
) -> tuple[Batch | None, list[int]]:
    """(batch of the readable samples of ``indices`` or None, their positions in ``indices``). A damaged
    sample is found by reading the batch's samples one by one, then skipped from then on."""
    keep = [k for k, i in enumerate(indices) if dataset.sample_ids[i] not in skipped]
    try:
        return (dataset.read_batch(reader, [indices[k] for k in keep]) if keep else None), keep
    except CorruptSample:
        before = len(skipped)
        for k in keep:
            try:
                dataset.read_batch(reader, [indices[k]])
            except CorruptSample as exc:
                skipped.add(dataset.sample_ids[indices[k]])
                log.warning(f"validation skips {dataset.sample_ids[indices[k]]}: {exc}")
        if len(skipped) == before:  # no single sample is to blame: not something skipping can fix
            raise
    return _read(dataset, reader, indices, skipped)


@torch.no_grad()
def validation_loss(
    policy: Policy, dataset: CachedFeatures, cfg: TrainConfig, device: str, dtype: torch.dtype
) -> float:
    """Mean loss over the split (``cfg.val_draws`` fixed draws per sample); NaN if nothing was readable."""
    policy.eval()
    skipped: set[str] = getattr(dataset, "skipped", set())
    dataset.skipped = skipped  # type: ignore[attr-defined]  # remembered across validations
    reader = getattr(dataset, "val_reader", None)
    if reader is None:  # one slot: each batch is consumed before the next is read
        reader = dataset.val_reader = dataset.batch_reader(
            cfg.micro_batch, slots=1, pin=device.startswith("cuda")
        )  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(VAL_SEED)
    total, count = 0.0, 0
    for idx in epoch_batches(dataset.lengths, cfg.micro_batch, seed=0, epoch=0, shuffle=False):
        batch, keep = _read(dataset, reader, idx, skipped)
        t, noise = draw_noise(len(idx), cfg.val_draws, batch.action.shape[1] if batch is not None else 64, g)
        if batch is None:
            continue
        prefix = Prefix.from_batch(batch).to(device)
        with autocast(device, dtype):
            loss = policy(prefix, batch.action.to(device), t[keep], noise[keep])
        total += loss.item() * len(keep)
        count += len(keep)
    return total / count if count else float("nan")
