"""Feeding the training loop: this rank's batches in the run's order, resumable, and the seed of each
micro-batch's randomness (named by its place in the epoch, so any split over ranks draws the same)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.store.dataset import Batch, CachedFeatures, collate, rank_batches
from alpamayo_cache.train.checkpoints import TrainState


def noise_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one micro-batch's flow-matching draws, named by its place in the epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{batch_index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def batch_stream(
    dataset: CachedFeatures, cfg: TrainConfig, state: TrainState, rank: int, world: int, pin: bool
) -> Iterator[tuple[int, int, Batch]]:
    """Endless (epoch, batch index, batch); ``state`` (epoch, batch_in_epoch) advances as batches are taken."""
    from torch.utils.data import DataLoader

    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if pin else 0)
    while True:
        mine = rank_batches(dataset.lengths, cfg.micro_batch, cfg.seed, state.epoch, rank, world)
        remaining = mine[state.batch_in_epoch :]
        loader = DataLoader(
            dataset,
            batch_sampler=[idx for _, idx in remaining],
            collate_fn=collate,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=2 if workers else None,
        )
        for (index, _), batch in zip(remaining, loader, strict=True):
            state.batch_in_epoch += 1
            yield state.epoch, index, batch
        state.epoch += 1
        state.batch_in_epoch = 0
