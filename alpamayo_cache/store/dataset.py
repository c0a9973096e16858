"""Batches of committed samples, with length-bucketed, resumable batch order.

Samples of equal prefix length L are batched together so no padding is needed; only a final
mixed-length remainder is right-padded (and masked by the expert). The batch order of epoch e is a
pure function of (seed, e), so a resumed run skips the batches it already consumed and sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alpamayo_cache.errors import UserError
from alpamayo_cache.store.reader import CachedSample, StoreReader


class CachedFeatures(Dataset):
    """Item = one committed sample (K/V, rope delta, ground truth). Opens the store lazily per worker."""

    def __init__(self, root: Path, sample_ids: list[str], reader: StoreReader | None = None) -> None:
        self.root = Path(root)
        self.sample_ids = list(sample_ids)
        self._reader = reader
        reader = reader or StoreReader(self.root)
        self.lengths = [reader.sample_info(s).length for s in self.sample_ids]

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
    """A micro-batch as the model consumes it. K/V stay in their stored precision.

    keys, values: [l, b, h, t, d] (t = longest prefix; shorter ones right-padded with zeros)
    kv_scale:     [b, l, 2] fp32 dequantisation scales (fp8 stores) or None
    rope_deltas, lengths: [b]; hidden [b, D]; action [b, w, 2]; trajectories in the ego frame at t0.
    prompt_hidden [b, t, D], position_ids [3, b, t], prompt_mask [b, t] | None: --vlm-from-layer
    stores only (right-padded with zeros like the K/V), else None.
    """

    sample_ids: list[str]
    keys: torch.Tensor
    values: torch.Tensor
    kv_scale: torch.Tensor | None
    rope_deltas: torch.Tensor
    lengths: torch.Tensor
    hidden: torch.Tensor
    action: torch.Tensor
    hist_xyz: torch.Tensor
    hist_rot: torch.Tensor
    fut_xyz: torch.Tensor
    fut_rot: torch.Tensor
    prompt_hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None

    def pin_memory(self) -> Batch:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.pin_memory())
        return self


def _padded(parts: list[torch.Tensor], longest: int) -> torch.Tensor:
    """Stack [l, h, L_i, d] tensors into [l, b, h, longest, d], zero-padded (copied as raw bytes, so
    every stored dtype, fp8 included, takes the same path)."""
    first = parts[0]
    raw = [p.view(torch.uint8) for p in parts]
    layers, heads, _, width = raw[0].shape
    out = torch.zeros(layers, len(parts), heads, longest, width, dtype=torch.uint8)
    for i, r in enumerate(raw):
        out[:, i, :, : r.shape[2]] = r
    return out.view(first.dtype)


def _padded_rows(parts: list[torch.Tensor], longest: int, axis: int, fill: int = 0) -> torch.Tensor:
    """Stack tensors whose ``axis`` is the token axis into a new batch axis ``axis``, right-padded."""
    shape = list(parts[0].shape)
    shape[axis] = longest
    out = torch.full([len(parts), *shape], fill, dtype=parts[0].dtype)
    for i, p in enumerate(parts):
        out[i].narrow(axis, 0, p.shape[axis]).copy_(p)
    return out


def _prompt_fields(samples: list[CachedSample], longest: int) -> dict[str, torch.Tensor | None]:
    """The --vlm-from-layer arrays of a batch (None for samples of a full store)."""
    if samples[0].prompt_hidden is None:
        return {}
    masks = [s.prompt_mask for s in samples]
    mask = None
    if any(m is not None for m in masks):
        ones = [
            torch.ones(s.info.length, dtype=torch.uint8) if m is None else m
            for s, m in zip(samples, masks, strict=True)
        ]
        mask = _padded_rows(ones, longest, 0, fill=1)  # padding stays invisible: attention is causal
    return {
        "prompt_hidden": _padded_rows([s.prompt_hidden for s in samples], longest, 0),  # type: ignore[misc]
        "position_ids": _padded_rows([s.position_ids for s in samples], longest, 1)
        .transpose(0, 1)
        .contiguous(),  # type: ignore[misc]
        "prompt_mask": mask,
    }


def collate(samples: list[CachedSample]) -> Batch:
    """Stack samples; K/V are right-padded to the longest prefix in the batch."""
    longest = max(s.info.length for s in samples)
    scales = [s.kv_scale for s in samples]
    return Batch(
        sample_ids=[s.info.sample_id for s in samples],
        keys=_padded([s.keys for s in samples], longest),
        values=_padded([s.values for s in samples], longest),
        kv_scale=torch.stack(scales) if scales[0] is not None else None,  # type: ignore[arg-type]
        rope_deltas=torch.tensor([s.info.rope_delta for s in samples]),
        lengths=torch.tensor([s.info.length for s in samples]),
        hidden=torch.stack([s.hidden for s in samples]),
        action=torch.stack([s.action for s in samples]),
        hist_xyz=torch.stack([s.hist_xyz for s in samples]),
        hist_rot=torch.stack([s.hist_rot for s in samples]),
        fut_xyz=torch.stack([s.fut_xyz for s in samples]),
        fut_rot=torch.stack([s.fut_rot for s in samples]),
        **_prompt_fields(samples, longest),
    )


def rank_batches(
    lengths: list[int], micro_batch: int, seed: int, epoch: int, rank: int, world: int
) -> list[tuple[int, list[int]]]:
    """This rank's batches of one epoch as (index in the epoch's order, sample indices).

    Round r of an epoch gives rank k the batch r * world + k (ranks stay in lockstep; the epoch's last
    partial round is dropped). The index names the batch independently of how many ranks share the
    epoch, so per-batch randomness seeded by it is the same under any split of the work."""
    order = epoch_batches(lengths, micro_batch, seed, epoch)
    rounds = len(order) // world
    if rounds == 0:
        raise UserError(
            f"{len(order)} batch(es) per epoch cannot feed {world} ranks: lower --micro-batch or use fewer GPUs"
        )
    return [(r * world + rank, order[r * world + rank]) for r in range(rounds)]
