"""Batches of committed samples, with length-bucketed, resumable batch order.

Samples of equal prefix length L are batched together so no padding is needed; only a final
mixed-length remainder is right-padded (and masked by the expert), or left-padded the way the 1.5
release batches its prompts (``pad_side="left"``: a key mask marks the pads). A routed sample carries its
unguided suffix along; ``model.guidance`` turns those into the batch's unguided prefix when asked. The batch order of epoch e is a
pure function of (seed, e), so a resumed run skips the batches it already consumed and sees exactly
the batches the uninterrupted run would have seen.

Two ways to a ``Batch``: ``CachedFeatures.read_batch`` (the fast path: a whole micro-batch straight into
a ``fast_read.BatchReader`` ring slot, no per-sample copy; the training feed and validation use it) and
``dataset[i]`` + ``collate`` (per-sample zarr reads; evaluation and tools).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import format as F
from alpamayo_cache.store.fast_read import BatchReader, KVBatch
from alpamayo_cache.store.format import SampleInfo
from alpamayo_cache.store.quant import KVQuant
from alpamayo_cache.store.reader import EXTRAS, CachedSample, StoreReader


class CachedFeatures(Dataset):
    """Item = one committed sample (K/V, rope delta, ground truth; with ``front``, its front-camera
    image for the rewards). Opens the store lazily per worker."""

    def __init__(
        self, root: Path, sample_ids: list[str], reader: StoreReader | None = None, front: bool = False
    ) -> None:
        self.root = Path(root)
        self.sample_ids = list(sample_ids)
        self.front = front
        self._reader = reader
        reader = reader or StoreReader(self.root)
        self.info = reader.info
        self.infos = infos = [reader.sample_info(s) for s in self.sample_ids]
        self.lengths = [i.length for i in infos]
        self.rope_deltas = [i.rope_delta for i in infos]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> CachedSample:
        if self._reader is None:  # one reader per DataLoader worker process
            self._reader = StoreReader(self.root)
        return self._reader.read(self.sample_ids[index], front=self.front)

    def kv_dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the stored K/V, from the first sample's kv array metadata."""
        path = self.root / F.SAMPLES_DIR / self.sample_ids[0] / F.KV / "zarr.json"
        try:
            layers, _, heads, _, width = json.loads(path.read_text())["shape"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise F.CorruptSample(
                f"sample {self.sample_ids[0]}: kv metadata is unreadable ({type(exc).__name__}); "
                f"run `alpamayo-cache repair {self.root}`"
            ) from None
        return int(layers), int(heads), int(width) * (2 if self.info.kv_dtype == "int4" else 1)

    def batch_reader(
        self, micro_batch: int, slots: int = 2, threads: int | None = None, pin: bool | None = None
    ) -> BatchReader:
        """A fast-path reader sized for this dataset's longest prefix (``read_batch`` fills its ring)."""
        layers, heads, head_dim = self.kv_dims()
        return BatchReader(
            layers, micro_batch, heads, max(self.lengths), head_dim, self.info.kv_dtype,
            slots=slots, threads=threads, pin=pin, group=self.info.kv_group or None,
        )  # fmt: skip

    def read_batch(self, reader: BatchReader, indices: list[int]) -> Batch:
        """Samples ``indices`` as one Batch whose tensors are views into ``reader``'s next ring slot (valid
        until that slot is filled again). The one function the feed and validation read through."""
        items = [
            (self.root / F.SAMPLES_DIR / self.sample_ids[i], self.sample_ids[i], self.lengths[i])
            for i in indices
        ]
        batch = batch_of(reader.read(items), torch.tensor([self.rope_deltas[i] for i in indices]))
        return self._with_extras(batch, indices)

    def _with_extras(self, batch: Batch, indices: list[int]) -> Batch:
        """The batch's infos and the small per-sample arrays beside K/V (unguided suffixes, front images,
        prompt states), read per sample next to the fast K/V read."""
        infos = [self.infos[i] for i in indices]
        batch.infos = infos
        routed = any(i.route_start >= 0 for i in infos)
        if not (self.front or routed or self.info.vlm_from_layer is not None):
            return batch
        if self._reader is None:
            self._reader = StoreReader(self.root)
        extras = [self._reader.extras(i.sample_id, self.front) for i in infos]
        for name, value in extra_fields(infos, extras, batch.keys.shape[-2]).items():
            setattr(batch, name, value)
        return batch


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
class UncondSuffix:
    """A routed sample's unguided prefix = its first ``route_start`` K/V tokens, then ``keys``/``values``
    [l, h, S, d] (stored precision); ``length`` and ``rope_delta`` are the unguided prompt's."""

    route_start: int
    keys: torch.Tensor
    values: torch.Tensor
    length: int
    rope_delta: int


@dataclass
class Batch:
    """A micro-batch as the model consumes it. K/V stay in their stored precision.

    keys, values: [l, b, h, t, d] (t = longest prefix; shorter ones right-padded with zeros)
    kv_scale:     [b, l, 2] fp32 dequantisation scales (fp8 stores) or None
    rope_deltas, lengths: [b]; hidden [b, D]; action [b, w, 2]; trajectories in the ego frame at t0.
    front_image:  uint8 [b, H, W, 3] front-camera images (read for the rewards only) or None
    infos:        the samples' attributes (reasoning text, front camera record, ...)
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
    key_mask: torch.Tensor | None = None  # [b, t] bool, left padding only (False = pad)
    uncond: list[UncondSuffix | None] | None = None  # per sample; None when no sample has a route
    front_image: torch.Tensor | None = None
    infos: list[SampleInfo] = field(default_factory=list)
    quant: KVQuant | None = None  # int8/int4 stores: float16 (scale, zero) arrays, see store/quant.py
    slot: int | None = None  # the fast reader's ring slot the tensors live in (None: owned memory)
    prompt_hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None

    def pin_memory(self) -> Batch:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor | KVQuant):
                setattr(self, f.name, value.pin_memory())
        return self


def batch_of(kv: KVBatch, rope_deltas: torch.Tensor) -> Batch:
    """The fast reader's batch as the model consumes it (the same tensors, no copy)."""
    return Batch(
        sample_ids=kv.sample_ids,
        keys=kv.keys,
        values=kv.values,
        kv_scale=kv.kv_scale,
        rope_deltas=rope_deltas,
        lengths=kv.lengths,
        hidden=kv.hidden,
        action=kv.action,
        hist_xyz=kv.hist_xyz,
        hist_rot=kv.hist_rot,
        fut_xyz=kv.fut_xyz,
        fut_rot=kv.fut_rot,
        quant=kv.quant,
        slot=kv.slot,
    )


def _padded(parts: list[torch.Tensor], longest: int | None = None, left: bool = False) -> torch.Tensor:
    """Stack [l, h, L_i, d] tensors into [l, b, h, longest, d], zero-padded on the right (or left)
    (copied as raw bytes, so every stored dtype, fp8 included, takes the same path). ``longest``
    defaults to the longest part."""
    longest = longest or max(p.shape[2] for p in parts)
    first = parts[0]
    raw = [p.view(torch.uint8) for p in parts]
    layers, heads, _, width = raw[0].shape
    out = torch.zeros(layers, len(parts), heads, longest, width, dtype=torch.uint8)
    for i, r in enumerate(raw):
        start = longest - r.shape[2] if left else 0
        out[:, i, :, start : start + r.shape[2]] = r
    return out.view(first.dtype)


def _padded_rows(parts: list[torch.Tensor], longest: int, axis: int, fill: int = 0) -> torch.Tensor:
    """Stack tensors whose ``axis`` is the token axis into a new batch axis ``axis``, right-padded."""
    shape = list(parts[0].shape)
    shape[axis] = longest
    out = torch.full([len(parts), *shape], fill, dtype=parts[0].dtype)
    for i, p in enumerate(parts):
        out[i].narrow(axis, 0, p.shape[axis]).copy_(p)
    return out


def _prompt_fields(
    infos: list[SampleInfo], extras: list[dict], longest: int
) -> dict[str, torch.Tensor | None]:
    """The --vlm-from-layer arrays of a batch, right-padded to ``longest`` ({} for a full store)."""
    if extras[0]["prompt_hidden"] is None:
        return {}
    masks = [e["prompt_mask"] for e in extras]
    mask = None
    if any(m is not None for m in masks):
        ones = [
            torch.ones(i.length, dtype=torch.uint8) if m is None else m
            for i, m in zip(infos, masks, strict=True)
        ]
        mask = _padded_rows(ones, longest, 0, fill=1)  # padding stays invisible: attention is causal
    return {
        "prompt_hidden": _padded_rows([e["prompt_hidden"] for e in extras], longest, 0),
        "position_ids": _padded_rows([e["position_ids"] for e in extras], longest, 1)
        .transpose(0, 1)
        .contiguous(),
        "prompt_mask": mask,
    }


def extra_fields(infos: list[SampleInfo], extras: list[dict], longest: int) -> dict:
    """Batch fields beyond K/V and truth from each sample's extras (``StoreReader.extras``): the infos,
    routed samples' unguided suffixes, front images, --vlm-from-layer prompt states."""
    uncond = [
        None
        if e["uncond_keys"] is None
        else UncondSuffix(
            i.route_start, e["uncond_keys"], e["uncond_values"], i.uncond_length, i.uncond_rope_delta
        )
        for i, e in zip(infos, extras, strict=True)
    ]
    fronts = [e["front_image"] for e in extras]
    return {
        "infos": infos,
        "uncond": uncond if any(u is not None for u in uncond) else None,
        "front_image": torch.stack(fronts) if all(f is not None for f in fronts) else None,
        **_prompt_fields(infos, extras, longest),
    }


def collate(samples: list[CachedSample], pad_side: str = "right") -> Batch:
    """Stack samples; K/V are padded to the longest prefix in the batch. Left padding moves each
    sample's rope delta and length into padded coordinates (positions stay rope_delta + L); it is for
    full stores (prompt states are right-padded)."""
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be right or left, got {pad_side!r}")
    if pad_side == "left" and samples[0].prompt_hidden is not None:
        raise ValueError("--vlm-from-layer batches are right-padded")
    longest = max(s.info.length for s in samples)
    left = pad_side == "left"
    real = torch.tensor([s.info.length for s in samples])
    pads = longest - real if left else torch.zeros_like(real)
    scales = [s.kv_scale for s in samples]
    quant = None
    if samples[0].k_quant is not None:
        k = [s.k_quant for s in samples]
        v = [s.v_quant for s in samples]
        quant = KVQuant(
            samples[0].kv_dtype, samples[0].kv_group,
            _padded([x[:, 0] for x in k]), _padded([x[:, 1] for x in k]),
            _padded([x[:, 0] for x in v], longest), _padded([x[:, 1] for x in v], longest),
        )  # fmt: skip
    return Batch(
        sample_ids=[s.info.sample_id for s in samples],
        keys=_padded([s.keys for s in samples], longest, left),
        values=_padded([s.values for s in samples], longest, left),
        kv_scale=torch.stack(scales) if scales[0] is not None else None,  # type: ignore[arg-type]
        rope_deltas=torch.tensor([s.info.rope_delta for s in samples]) - pads,
        lengths=real + pads,
        hidden=torch.stack([s.hidden for s in samples]),
        action=torch.stack([s.action for s in samples]),
        hist_xyz=torch.stack([s.hist_xyz for s in samples]),
        hist_rot=torch.stack([s.hist_rot for s in samples]),
        fut_xyz=torch.stack([s.fut_xyz for s in samples]),
        fut_rot=torch.stack([s.fut_rot for s in samples]),
        key_mask=(torch.arange(longest)[None, :] >= pads[:, None]) if left else None,
        quant=quant,
        **extra_fields(
            [s.info for s in samples], [{k: getattr(s, k) for k in EXTRAS} for s in samples], longest
        ),
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
