"""A torch Dataset over committed store samples, with length-bucketed, resumable batch order.

Samples of equal prefix length L are batched together so no padding is needed; only a final
mixed-length remainder is right-padded (and masked by the expert). The batch order of epoch e is a
pure function of (seed, e), so a resumed run skips the batches it already consumed and sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.store.reader import CachedSample, StoreReader


class CachedFeatures(Dataset):
    """Item = one committed sample (K/V, rope delta, ground truth). Opens the store lazily per worker."""

    def __init__(self, root: Path, sample_ids: list[str]) -> None:
        self.root = Path(root)
        self.sample_ids = list(sample_ids)
        self._reader: StoreReader | None = None
        reader = StoreReader(self.root)
        infos = reader.sample_infos()
        self.lengths = [infos[s].length for s in self.sample_ids]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> CachedSample:
        if self._reader is None:  # one reader per DataLoader worker process
            self._reader = StoreReader(self.root)
        return self._reader.read(self.sample_ids[index])


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Deterministic batches for one epoch: shuffle, then fill one bucket per length."""
    order = list(range(len(lengths)))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
    buckets: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for i in order:
        bucket = buckets.setdefault(lengths[i], [])
        bucket.append(i)
        if len(bucket) == batch_size:
            batches.append(bucket)
            buckets[lengths[i]] = []
    leftovers = [i for bucket in buckets.values() for i in bucket]
    batches += [leftovers[k : k + batch_size] for k in range(0, len(leftovers), batch_size)]
    return batches


@dataclass
class Batch:
    sample_ids: list[str]
    prefix: Prefix
    action: torch.Tensor  # [b, w, 2]
    hist_xyz: torch.Tensor
    hist_rot: torch.Tensor
    fut_xyz: torch.Tensor
    fut_rot: torch.Tensor

    def pin_memory(self) -> Batch:
        self.prefix = Prefix(
            self.prefix.keys.pin_memory(),
            self.prefix.values.pin_memory(),
            self.prefix.rope_deltas,
            self.prefix.lengths,
        )
        return self


def collate(samples: list[CachedSample]) -> Batch:
    """Stack samples; K/V are right-padded to the longest prefix in the batch."""
    longest = max(s.info.length for s in samples)
    layers, heads, _, dim = samples[0].keys.shape
    keys = samples[0].keys.new_zeros(layers, len(samples), heads, longest, dim)
    values = torch.zeros_like(keys)
    for i, s in enumerate(samples):
        keys[:, i, :, : s.info.length] = s.keys
        values[:, i, :, : s.info.length] = s.values
    prefix = Prefix(
        keys=keys,
        values=values,
        rope_deltas=torch.tensor([s.info.rope_delta for s in samples]),
        lengths=torch.tensor([s.info.length for s in samples]),
    )
    return Batch(
        sample_ids=[s.info.sample_id for s in samples],
        prefix=prefix,
        action=torch.stack([s.action for s in samples]),
        hist_xyz=torch.stack([s.hist_xyz for s in samples]),
        hist_rot=torch.stack([s.hist_rot for s in samples]),
        fut_xyz=torch.stack([s.fut_xyz for s in samples]),
        fut_rot=torch.stack([s.fut_rot for s in samples]),
    )
