"""The hot-loop reader: committed samples straight from their chunk files into reused batch buffers.

``BatchReader`` reads a whole micro-batch into a small ring of reused (pinned when CUDA is present) buffers
and hands out views in the stored dtype: bf16 bits as ``torch.bfloat16``, fp32, fp8 bytes as
``torch.float8_e4m3fn`` with the per-sample scales, int8/int4 codes as ``torch.uint8`` with their float16
(scale, zero) arrays (all dequantised later, on the device). Each chunk file goes through
``chunks.read_chunk`` (``os.preadv`` into the slot, crc32c over each piece while hot). Against zarr +
``collate`` this drops two copies and the page faults of writing into fresh 441 MB arrays (issue 13).
An array the fast path does not recognise (``chunk_plan`` is None: another codec chain, sharding, another
chunk-key encoding) is read through zarr instead, logged once per reason. A missing, truncated, extended or
crc-failing chunk raises ``CorruptSample`` naming the sample, the array and the chunk.

Threads: a pool over chunk files, each task reading and checksumming its own file, so both halves of
the work run on every core. Measured on a shared 2-core VM (warm page cache, 441 MB bf16 sample, ratio to a
plain single-thread read, best of rounds): one thread 0.55-0.85 (read then crc on one core: the crc at
~10 GB/s costs about half the read again); a pool of two 1.1-1.36 while the second core is free, 0.6-1.0
while other work holds it; a pool of three 0.5-1.4 (more threads than cores adds contention); one reader
thread feeding a separate crc thread piece by piece 0.64-1.09 (it can at best match the read). Hence the
pool, ``threads`` defaulting to ``os.cpu_count()`` capped at 4 (untested above 2 cores: past a few threads
memory bandwidth, not cores, should bound a copy + a crc pass per byte). ``benchmarks/real_size_io.py``
measures it on any machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import format as F
from alpamayo_cache.store import quant as Q
from alpamayo_cache.store.chunks import (  # noqa: F401  (re-exported: the fast path's public names)
    CRC_BYTES,
    CRC_RELEASES_GIL,
    PIECE,
    ChunkPlan,
    byte_view,
    chunk_plan,
    plan_from_meta,
    read_chunk,
)
from alpamayo_cache.store.chunks import corrupt_sample as _corrupt
from alpamayo_cache.store.format import CorruptSample  # = store.reader.CorruptSample

log = logging.getLogger(__name__)

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
_TORCH_DTYPE |= {"int8": torch.uint8, "int4": torch.uint8}
SMALL_ARRAYS = (F.HIDDEN, *F.TRUTH_ARRAYS)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class KVBatch:
    """One micro-batch, as views into a ring slot: valid until the reader refills that slot
    (``slots`` reads later). Shapes: b samples, l layers, h kv-heads, t longest prefix, d head dim,
    w stored width of a head row (d, or d/2 for int4)."""

    sample_ids: list[str]
    kv_dtype: str
    keys: torch.Tensor  # [l, b, h, t, w] stored dtype; zero past each sample's length
    values: torch.Tensor  # [l, b, h, t, w]
    lengths: torch.Tensor  # [b] int64 prefix lengths L
    kv_scale: torch.Tensor | None  # [b, l, 2] fp32 dequantisation scale (K, V) per layer; fp8 only
    quant: Q.KVQuant | None  # int8/int4 only: (scale, zero) per K channel group / V token group
    hidden: torch.Tensor  # [b, D]
    hist_xyz: torch.Tensor  # [b, 16, 3] ego frame at t0, metres
    hist_rot: torch.Tensor  # [b, 16, 3, 3]
    fut_xyz: torch.Tensor  # [b, 64, 3]
    fut_rot: torch.Tensor  # [b, 64, 3, 3]
    action: torch.Tensor  # [b, w, 2] normalised (accel, curvature)
    slot: int


@dataclass(frozen=True)
class _Paired:
    """An array stored per sample as [l, 2, h, n, w] with n set by the sample's length L, read into two
    halves [l, b, h, n_max, w] of a slot: kv (K | V), k_quant and v_quant (scale | zero)."""

    name: str
    dtype: np.dtype
    torch_dtype: torch.dtype
    width: int
    group: int  # rows = ceil(L / group) token groups; 0: one row per token; -1: a single row

    def rows(self, length: int) -> int:
        return length if self.group == 0 else 1 if self.group < 0 else math.ceil(length / self.group)


@dataclass
class _Slot:
    paired: dict[str, tuple[torch.Tensor, np.ndarray]]  # flat bytes (first half | second half), as numpy too
    lengths: torch.Tensor
    small: dict[str, torch.Tensor]  # [micro_batch, *shape]; allocated on the first read of that array


class BatchReader:
    """Reads micro-batches of committed samples into a ring of ``slots`` reused batch buffers.

    ``slots=2`` (default): the batch the training step is using plus the one being filled; a prefetcher
    that keeps p batches ready needs p + 1, and one more while a non_blocking host->device copy of a
    consumed batch may still be in flight. Memory: slots x 2 x l x micro_batch x h x max_len x w x itemsize
    (441 MB per real-size bf16 sample), plus int8/int4 scales. Not thread-safe: call ``read`` from one thread.
    ``group``: the store's int4 group (StoreInfo.kv_group; default ``quant.default_group``).
    """

    def __init__(
        self,
        layers: int,
        micro_batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        kv_dtype: str,
        slots: int = 2,
        threads: int | None = None,
        pin: bool | None = None,
        piece: int = PIECE,
        group: int | None = None,
    ) -> None:
        if kv_dtype not in _TORCH_DTYPE:
            raise UserError(f"kv dtype must be one of {tuple(_TORCH_DTYPE)}, got {kv_dtype!r}")
        if min(layers, micro_batch, kv_heads, max_len, head_dim, slots, piece) < 1:
            raise UserError("BatchReader dimensions, slots and piece must all be >= 1")
        self.dims = (layers, micro_batch, kv_heads, max_len, head_dim)
        self.kv_dtype = kv_dtype
        self.group = Q.default_group(kv_dtype, head_dim) if group is None else group
        self.disk_dtype = F.disk_dtype(kv_dtype)
        self.threads = threads or default_threads()
        self.piece = piece
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.small_names = SMALL_ARRAYS + ((F.KV_SCALE,) if kv_dtype == "fp8" else ())
        width = Q.code_width(head_dim, kv_dtype)
        self.paired = [_Paired(F.KV, self.disk_dtype, _TORCH_DTYPE[kv_dtype], width, 0)]
        if kv_dtype in Q.INT_BITS:
            Q.check_dims(kv_dtype, head_dim, self.group)
            half, key_group = np.dtype(np.float16), self.group or -1
            nv = Q.value_groups(head_dim, self.group)
            self.paired.append(_Paired(F.K_QUANT, half, torch.float16, head_dim, key_group))
            self.paired.append(_Paired(F.V_QUANT, half, torch.float16, nv, 0))
        self._slots = [self._new_slot() for _ in range(slots)]
        self._small_specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None  # created on first use, so a fork before that is safe
        self._logged: set[tuple[str, str]] = set()

    def _half_bytes(self, p: _Paired) -> int:
        layers, micro_batch, heads, max_len, _ = self.dims
        return layers * micro_batch * heads * p.rows(max_len) * p.width * p.dtype.itemsize

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # page-locked: resident already
        return torch.zeros(shape, dtype=dtype)  # zeros touches every page now, not on the first read

    def _new_slot(self) -> _Slot:
        paired = {}
        for p in self.paired:
            flat = self._alloc((2 * self._half_bytes(p),), torch.uint8)
            paired[p.name] = (flat, flat.numpy())
        return _Slot(paired, self._alloc((self.dims[1],), torch.int64), {})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, samples: Sequence[tuple[Path, str, int]]) -> KVBatch:
        """Read ``samples`` = [(sample_dir, sample_id, length L), ...] into the next ring slot."""
        layers, micro_batch, heads, max_len, _ = self.dims
        if not 1 <= len(samples) <= micro_batch:
            raise UserError(
                f"a batch holds 1..{micro_batch} samples (the reader's micro_batch), got {len(samples)}"
            )
        longest = max(length for _, _, length in samples)
        if longest > max_len:
            raise UserError(
                f"a sample has L={longest} > max_len={max_len}: size the BatchReader for the store's longest prefix"
            )
        slot = self._slots[self._next]
        index, self._next = self._next, (self._next + 1) % len(self._slots)
        for sample_dir, sample_id, _ in samples:
            if not Path(sample_dir).is_dir():
                raise UserError(f"sample {sample_id} is not committed ({sample_dir} does not exist)")
        b = len(samples)
        views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        tasks: list[Callable[[], None]] = []
        for p in self.paired:
            flat, flat_bytes = slot.paired[p.name]
            half, rows = self._half_bytes(p), p.rows(longest)
            count = layers * b * heads * rows * p.width * p.dtype.itemsize  # bytes of each half in this batch
            first = flat[:count].view(p.torch_dtype).view(layers, b, heads, rows, p.width)
            second = flat[half : half + count].view(p.torch_dtype).view(first.shape)
            views[p.name] = (first, second)
            for j, (sample_dir, sample_id, length) in enumerate(samples):
                if p.rows(length) < rows:  # only the pad region: the rest is overwritten by this read
                    first[:, j, :, p.rows(length) :].zero_()
                    second[:, j, :, p.rows(length) :].zero_()
                placement = (flat_bytes[:count], flat_bytes[half : half + count], j, b, length, longest)
                tasks += self._paired_tasks(p, Path(sample_dir), sample_id, placement)
        for j, (sample_dir, sample_id, _) in enumerate(samples):
            for name in self.small_names:
                tasks.append(self._small_task(slot, Path(sample_dir), sample_id, name, j))
        self._run(tasks)
        slot.lengths[:b] = torch.as_tensor([length for _, _, length in samples])

        def small(name: str) -> torch.Tensor:
            return slot.small[name][:b]

        quant = None
        if F.K_QUANT in views:
            quant = Q.KVQuant(self.kv_dtype, self.group, *views[F.K_QUANT], *views[F.V_QUANT])
        return KVBatch(
            sample_ids=[sample_id for _, sample_id, _ in samples],
            kv_dtype=self.kv_dtype,
            keys=views[F.KV][0],
            values=views[F.KV][1],
            lengths=slot.lengths[:b],
            kv_scale=small(F.KV_SCALE) if self.kv_dtype == "fp8" else None,
            quant=quant,
            hidden=small(F.HIDDEN),
            hist_xyz=small(F.HIST_XYZ),
            hist_rot=small(F.HIST_ROT),
            fut_xyz=small(F.FUT_XYZ),
            fut_rot=small(F.FUT_ROT),
            action=small(F.ACTION),
            slot=index,
        )

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        if self.threads == 1:
            for task in tasks:
                task()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fast-read")
        futures: list[Future] = [self._pool.submit(task) for task in tasks]
        wait(futures)  # every task has finished writing into the slot before anything is raised
        for future in futures:
            future.result()

    def _describe(
        self, array_dir: Path, sample_id: str, name: str
    ) -> tuple[tuple[int, ...], np.dtype, ChunkPlan | None]:
        """(shape, dtype, plan or None for the zarr fallback) of one array of one sample."""
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
        except FileNotFoundError:
            raise _corrupt(sample_id, f"array {name} is missing") from None
        except (OSError, ValueError) as exc:
            raise _corrupt(sample_id, f"{name}/zarr.json is unreadable ({exc})") from None
        plan = plan_from_meta(array_dir, meta)
        if isinstance(plan, ChunkPlan):
            whole = plan.chunk_shape == plan.shape
            by_layer = (
                any(name == p.name for p in self.paired)
                and plan.chunk_shape[1:] == plan.shape[1:]
                and plan.shape[0] % plan.chunk_shape[0] == 0
            )
            if whole or by_layer:
                return plan.shape, plan.dtype, plan
            reason = f"chunks {plan.chunk_shape} of {plan.shape}"
        else:
            reason = plan
        if (name, reason) not in self._logged:
            self._logged.add((name, reason))
            log.info(
                f"fast read: {name} of sample {sample_id} has {reason}; reading such arrays through zarr"
            )
        try:
            shape, dtype = tuple(meta["shape"]), np.dtype(meta["data_type"])
        except (KeyError, TypeError) as exc:
            raise _corrupt(sample_id, f"{name}/zarr.json is malformed ({exc})") from None
        return shape, dtype, None

    def _paired_tasks(
        self, p: _Paired, sample_dir: Path, sample_id: str, placement: tuple
    ) -> list[Callable[[], None]]:
        """Tasks that read one sample's [l, 2, h, n, w] array into its row of the two halves."""
        first_bytes, second_bytes, j, b, length, longest = placement
        layers, _, heads, _, _ = self.dims
        n, n_max = p.rows(length), p.rows(longest)
        shape, dtype, plan = self._describe(sample_dir / p.name, sample_id, p.name)
        if shape != (layers, 2, heads, n, p.width) or dtype != p.dtype:
            expected = f"{p.dtype}{[layers, 2, heads, n, p.width]} (kv dtype {self.kv_dtype}, L={length})"
            raise _corrupt(sample_id, f"{p.name} is {dtype}{list(shape)} on disk, expected {expected}")
        isz = dtype.itemsize
        head_bytes, row_stride = n * p.width * isz, n_max * p.width * isz  # one head's rows; its stride

        def segments(first: int, stop: int) -> list[np.ndarray]:
            """Destinations of layers [first, stop) in file order: per layer the first half's heads, then
            the second half's."""
            out = []
            for layer in range(first, stop):
                start = ((layer * b + j) * heads) * row_stride
                for half in (first_bytes, second_bytes):
                    if n == n_max:  # all heads of this sample are adjacent: one segment
                        out.append(half[start : start + heads * head_bytes])
                    else:
                        out += [half[start + hh * row_stride :][:head_bytes] for hh in range(heads)]
            return out

        if plan is None:
            return [partial(self._zarr_read, sample_dir / p.name, sample_id, p.name, segments(0, layers))]
        per_chunk = plan.chunk_shape[0]
        return [
            partial(
                read_chunk,
                sample_dir / p.name / chunk,
                segments(c * per_chunk, (c + 1) * per_chunk),
                sample_id=sample_id,
                array=p.name,
                piece=self.piece,
            )
            for c, chunk in enumerate(plan.chunk_names)
        ]

    def _small_task(
        self, slot: _Slot, sample_dir: Path, sample_id: str, name: str, j: int
    ) -> Callable[[], None]:
        shape, dtype, plan = self._describe(sample_dir / name, sample_id, name)
        spec = self._small_specs.setdefault(name, (shape, dtype))
        if (shape, dtype) != spec:
            found, before = f"{dtype}{list(shape)}", f"{spec[1]}{list(spec[0])}"
            raise _corrupt(sample_id, f"{name} is {found} on disk; earlier samples had {before}")
        if name not in slot.small:  # once per slot and array, on the first read
            torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
            slot.small[name] = self._alloc((self.dims[1], *shape), torch_dtype)
        row_bytes = math.prod(shape) * dtype.itemsize
        dest = [byte_view(slot.small[name])[j * row_bytes : (j + 1) * row_bytes]]
        if plan is None:
            return partial(self._zarr_read, sample_dir / name, sample_id, name, dest)
        chunk = sample_dir / name / plan.chunk_names[0]
        return partial(read_chunk, chunk, dest, sample_id=sample_id, array=name, piece=self.piece)

    def _zarr_read(self, array_dir: Path, sample_id: str, name: str, segments: list[np.ndarray]) -> None:
        """The fallback: zarr decodes the whole array (its codecs check the bytes), copied into segments."""
        import zarr

        try:
            arr = zarr.open_array(str(array_dir), mode="r")
            missing = arr.nchunks - arr.nchunks_initialized
            if missing:  # zarr would return fill values for a missing chunk
                raise _corrupt(sample_id, f"{name} has {missing} missing chunk(s) on disk")
            data = byte_view(np.ascontiguousarray(arr[...]))
        except CorruptSample:
            raise
        except Exception as exc:
            raise _corrupt(
                sample_id, f"{name} is corrupt on disk ({type(exc).__name__}: {str(exc)[:80]})"
            ) from exc
        pos = 0
        for seg in segments:
            seg[:] = data[pos : pos + seg.nbytes]
            pos += seg.nbytes
