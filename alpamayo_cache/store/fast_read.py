"""The hot-loop reader: committed samples straight from their chunk files into reused batch buffers.

The store format stays as the writer makes it (zarr v3, codec chain [bytes little-endian, crc32c], no
compression, one chunk file per layer for ``kv``, one chunk for every other array). Such a chunk file is
the chunk's raw little-endian bytes in C order followed by 4 bytes: the little-endian crc32c (Castagnoli) of
everything before them. ``read_chunk`` reads a file with ``os.preadv`` in ~1 MiB pieces directly into the
caller's memory, scattered where the caller wants it (K of a layer here, V there, one piece per head when
the batch is padded), and extends the crc over each piece while it is still in the core's cache. Against
zarr + ``collate`` this drops two copies and the page faults of writing into fresh 441 MB arrays (issue 13).

``BatchReader`` reads a whole micro-batch into a small ring of reused (pinned when CUDA is present) buffers
and hands out views in the stored dtype: bf16 bits as ``torch.bfloat16``, fp32, fp8 bytes as
``torch.float8_e4m3fn`` with the per-sample scales (dequantised later, on the device). An array the fast path
does not recognise (``chunk_plan`` is None: another codec chain, sharding, another chunk-key encoding) is read
through zarr instead, logged once per reason. A missing, truncated, extended or crc-failing chunk raises
``CorruptSample`` naming the sample, the array and the chunk.

GIL, checked in the sources: ``os.preadv`` releases it for the system call. google_crc32c 1.9's ``extend`` and
``value`` release it only for a ``bytes`` object of >= 1 MiB (``_crc32c.c``: ``PyBytes_Check``), never for
numpy/torch memory, so two threads checksumming buffers would take turns. We therefore call the same C
function, ``crc32c_extend`` of the libcrc32c that the google_crc32c wheel bundles, through ctypes (which
drops the GIL for the call); where that library is not found, ``google_crc32c.extend`` is used.
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

import ctypes
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import format as F
from alpamayo_cache.store.format import CorruptSample  # = store.reader.CorruptSample

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes per preadv call: fits the 2 MiB L2 of a core, so the crc pass reads from cache
CRC_BYTES = 4
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
_NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_NUMERIC |= {"float16", "float32", "float64"}
SMALL_ARRAYS = (F.HIDDEN, *F.TRUTH_ARRAYS)


def _load_crc_extend() -> tuple[Callable[[int, np.ndarray, int], int], bool]:
    """(crc32c extend over (view, address), whether it releases the GIL)."""
    import google_crc32c

    package = Path(google_crc32c.__file__).parent
    for path in sorted(package.parent.glob("google_crc32c.libs/libcrc32c*")) + sorted(
        package.glob("**/libcrc32c*")
    ):
        try:
            fn = ctypes.CDLL(str(path)).crc32c_extend  # CDLL (not PyDLL): the call runs without the GIL
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        probe = ctypes.create_string_buffer(b"123456789", 9)
        if fn(0, ctypes.addressof(probe), 9) == 0xE3069283 == google_crc32c.value(b"123456789"):
            return (lambda crc, view, address, fn=fn: fn(crc, address, view.nbytes)), True
    return (lambda crc, view, address: google_crc32c.extend(crc, view)), False


_crc_extend, CRC_RELEASES_GIL = _load_crc_extend()


def _corrupt(sample_id: str, problem: str) -> CorruptSample:
    return CorruptSample(
        f"sample {sample_id}: {problem}; run `alpamayo-cache repair` on the store and re-run precompute"
    )


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ChunkPlan:
    """Where the bytes of a zarr array the fast path understands are, and how many there are."""

    array_dir: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def chunk_nbytes(self) -> int:
        """Payload bytes of every chunk file (zarr stores edge chunks at full size); the crc comes after."""
        return math.prod(self.chunk_shape) * self.itemsize

    @property
    def chunk_names(self) -> list[str]:
        """File names in C order of the chunk grid ("default" key encoding, separator ".")."""
        return [".".join(["c", *map(str, idx)]) for idx in itertools.product(*map(range, self.grid))]


def plan_from_meta(array_dir: Path, meta: dict) -> ChunkPlan | str:
    """The plan of an array from its parsed zarr.json, or a short reason why the fast path can't read it."""
    try:
        return _plan(array_dir, meta)
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        return f"a malformed zarr.json ({type(exc).__name__})"


def _plan(array_dir: Path, meta: dict) -> ChunkPlan | str:
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return "not a zarr v3 array"
    if meta.get("storage_transformers"):
        return "storage transformers"
    name = meta.get("data_type")
    if not isinstance(name, str) or name not in _NUMERIC:
        return f"data type {name!r}"
    dtype = np.dtype(name)
    grid = meta.get("chunk_grid", {})
    shape = tuple(meta.get("shape", ()))
    chunk_shape = tuple(grid.get("configuration", {}).get("chunk_shape", ()))
    if grid.get("name") != "regular" or len(chunk_shape) != len(shape) or not all(shape + chunk_shape):
        return "not a regular, non-empty chunk grid"
    keys = meta.get("chunk_key_encoding", {})
    if keys.get("name") != "default" or keys.get("configuration", {}).get("separator") != ".":
        return f"chunk key encoding {keys}"
    codecs = meta.get("codecs", [])
    names = [c.get("name") for c in codecs]
    if names != ["bytes", "crc32c"] or codecs[1].get("configuration"):
        return f"codec chain {names} (the fast path reads exactly [bytes, crc32c])"
    endian = codecs[0].get("configuration", {}).get("endian")
    if not (endian == "little" or (endian is None and dtype.itemsize == 1)) or sys.byteorder != "little":
        return f"byte order {endian} on a {sys.byteorder}-endian host"
    return ChunkPlan(Path(array_dir), shape, dtype, chunk_shape)


def chunk_plan(array_dir: Path) -> ChunkPlan | None:
    """Plan for ``array_dir`` if its chunks are exactly [bytes little-endian, crc32c] files named c.i.j...
    (no sharding, no compression); None otherwise, and the caller reads the array through zarr."""
    try:
        meta = json.loads((Path(array_dir) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    plan = plan_from_meta(Path(array_dir), meta)
    return plan if isinstance(plan, ChunkPlan) else None


def byte_view(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A writable 1-D uint8 numpy view of contiguous numpy or (CPU, possibly pinned) torch memory."""
    if isinstance(x, torch.Tensor):
        if not x.is_contiguous():
            raise ValueError("byte_view needs a contiguous tensor")
        x = x.reshape(-1).view(torch.uint8).numpy()
    if not x.flags.c_contiguous:
        raise ValueError("byte_view needs a C-contiguous array")
    return x.reshape(-1).view(np.uint8)


def read_chunk(
    path: Path, segments: Sequence[np.ndarray], *, sample_id: str, array: str, piece: int = PIECE
) -> None:
    """Fill ``segments`` (1-D uint8 views, in file order) with the payload of the chunk file at ``path``,
    checking its size and crc32c. Raises ``CorruptSample`` naming the sample, array and chunk."""

    def corrupt(problem: str) -> CorruptSample:
        return _corrupt(sample_id, f"{array} chunk {Path(path).name} {problem}")

    expected = sum(s.nbytes for s in segments)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise corrupt("is missing on disk") from None
    try:
        size = os.fstat(fd).st_size
        if size != expected + CRC_BYTES:
            raise corrupt(
                f"has {size} bytes on disk, expected {expected + CRC_BYTES} (truncated or extended)"
            )
        crc, pos, filled = 0, 0, 0
        views: list[np.ndarray] = []  # one preadv's destinations, ~piece bytes in all
        addresses: list[int] = []

        def flush() -> None:
            nonlocal crc, pos, filled
            if os.preadv(fd, views, pos) != filled:
                raise corrupt("changed size while being read")
            for view, address in zip(views, addresses, strict=True):
                crc = _crc_extend(crc, view, address)  # while the piece is still in this core's cache
            pos, filled = pos + filled, 0
            views.clear()
            addresses.clear()

        for seg in segments:
            base, end, off = seg.ctypes.data, seg.nbytes, 0
            while off < end:
                take = min(piece - filled, end - off)
                views.append(seg[off : off + take])
                addresses.append(base + off)
                filled, off = filled + take, off + take
                if filled == piece:
                    flush()
        if filled:
            flush()
        stored = int.from_bytes(os.pread(fd, CRC_BYTES, pos), "little")
        if stored != crc:
            raise corrupt(f"fails its crc32c check (stored {stored:#010x}, computed {crc:#010x})")
    finally:
        os.close(fd)


@dataclass
class KVBatch:
    """One micro-batch, as views into a ring slot: valid until the reader refills that slot
    (``slots`` reads later). Shapes: b samples, l layers, h kv-heads, t longest prefix, d head dim."""

    sample_ids: list[str]
    kv_dtype: str
    keys: torch.Tensor  # [l, b, h, t, d] stored dtype; zero past each sample's length
    values: torch.Tensor  # [l, b, h, t, d]
    lengths: torch.Tensor  # [b] int64 prefix lengths L
    kv_scale: torch.Tensor | None  # [b, l, 2] fp32 dequantisation scale (K, V) per layer; fp8 only
    hidden: torch.Tensor  # [b, D]
    hist_xyz: torch.Tensor  # [b, 16, 3] ego frame at t0, metres
    hist_rot: torch.Tensor  # [b, 16, 3, 3]
    fut_xyz: torch.Tensor  # [b, 64, 3]
    fut_rot: torch.Tensor  # [b, 64, 3, 3]
    action: torch.Tensor  # [b, w, 2] normalised (accel, curvature)
    slot: int


@dataclass
class _Slot:
    kv: torch.Tensor  # flat bytes: keys in the first half, values in the second
    kv_bytes: np.ndarray  # the same memory as numpy, for preadv
    lengths: torch.Tensor
    small: dict[str, torch.Tensor]  # [micro_batch, *shape]; allocated on the first read of that array


class BatchReader:
    """Reads micro-batches of committed samples into a ring of ``slots`` reused batch buffers.

    ``slots=2`` (default): the batch the training step is using plus the one being filled; a prefetcher
    that keeps p batches ready needs p + 1, and one more while a non_blocking host->device copy of a
    consumed batch may still be in flight. Memory: slots x 2 x l x micro_batch x h x max_len x d x itemsize
    (441 MB per real-size bf16 sample). Not thread-safe: call ``read`` from one thread (the prefetcher).
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
    ) -> None:
        if kv_dtype not in _TORCH_DTYPE:
            raise UserError(f"kv dtype must be one of {tuple(_TORCH_DTYPE)}, got {kv_dtype!r}")
        if min(layers, micro_batch, kv_heads, max_len, head_dim, slots, piece) < 1:
            raise UserError("BatchReader dimensions, slots and piece must all be >= 1")
        self.dims = (layers, micro_batch, kv_heads, max_len, head_dim)
        self.kv_dtype = kv_dtype
        self.disk_dtype = F.disk_dtype(kv_dtype)
        self.threads = threads or default_threads()
        self.piece = piece
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.small_names = SMALL_ARRAYS + ((F.KV_SCALE,) if kv_dtype == "fp8" else ())
        self._half = layers * micro_batch * kv_heads * max_len * head_dim * self.disk_dtype.itemsize
        self._slots = [self._new_slot() for _ in range(slots)]
        self._small_specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None  # created on first use, so a fork before that is safe
        self._logged: set[tuple[str, str]] = set()

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # page-locked: resident already
        return torch.zeros(shape, dtype=dtype)  # zeros touches every page now, not on the first read

    def _new_slot(self) -> _Slot:
        kv = self._alloc((2 * self._half,), torch.uint8)
        return _Slot(kv, kv.numpy(), self._alloc((self.dims[1],), torch.int64), {})

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
        layers, micro_batch, heads, max_len, dim = self.dims
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
        b, isz = len(samples), self.disk_dtype.itemsize
        n = layers * b * heads * longest * dim  # elements of keys (and of values) in this batch
        keys_bytes = slot.kv_bytes[: n * isz]
        values_bytes = slot.kv_bytes[self._half : self._half + n * isz]
        keys = slot.kv[: n * isz].view(_TORCH_DTYPE[self.kv_dtype]).view(layers, b, heads, longest, dim)
        values = slot.kv[self._half : self._half + n * isz].view(keys.dtype).view(keys.shape)

        tasks: list[Callable[[], None]] = []
        for j, (sample_dir, sample_id, length) in enumerate(samples):
            sample_dir = Path(sample_dir)
            if not sample_dir.is_dir():
                raise UserError(f"sample {sample_id} is not committed ({sample_dir} does not exist)")
            if length < longest:  # only the pad region: the rest is overwritten by this read
                keys[:, j, :, length:].zero_()
                values[:, j, :, length:].zero_()
            row = (keys_bytes, values_bytes, j, b, length, longest)
            tasks += self._kv_tasks(sample_dir, sample_id, row)
            for name in self.small_names:
                tasks.append(self._small_task(slot, sample_dir, sample_id, name, j))
        self._run(tasks)
        slot.lengths[:b] = torch.as_tensor([length for _, _, length in samples])

        def small(name: str) -> torch.Tensor:
            return slot.small[name][:b]

        return KVBatch(
            sample_ids=[sample_id for _, sample_id, _ in samples],
            kv_dtype=self.kv_dtype,
            keys=keys,
            values=values,
            lengths=slot.lengths[:b],
            kv_scale=small(F.KV_SCALE) if self.kv_dtype == "fp8" else None,
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
                name == F.KV
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

    def _kv_tasks(self, sample_dir: Path, sample_id: str, row: tuple) -> list[Callable[[], None]]:
        keys_bytes, values_bytes, j, b, length, longest = row
        layers, _, heads, _, dim = self.dims
        shape, dtype, plan = self._describe(sample_dir / F.KV, sample_id, F.KV)
        if shape != (layers, 2, heads, length, dim) or dtype != self.disk_dtype:
            expected = (
                f"{self.disk_dtype}{[layers, 2, heads, length, dim]} (kv dtype {self.kv_dtype}, L={length})"
            )
            raise _corrupt(sample_id, f"kv is {dtype}{list(shape)} on disk, expected {expected}")
        isz = dtype.itemsize
        head_bytes, token_stride = length * dim * isz, longest * dim * isz  # one head's rows; its stride

        def segments(first: int, stop: int) -> list[np.ndarray]:
            """Destinations of layers [first, stop) in file order: per layer K heads then V heads."""
            out = []
            for layer in range(first, stop):
                start = ((layer * b + j) * heads) * token_stride
                for half in (keys_bytes, values_bytes):
                    if length == longest:  # all heads of this sample are adjacent: one segment
                        out.append(half[start : start + heads * head_bytes])
                    else:
                        out += [half[start + hh * token_stride :][:head_bytes] for hh in range(heads)]
            return out

        if plan is None:
            return [partial(self._zarr_read, sample_dir / F.KV, sample_id, F.KV, segments(0, layers))]
        per_chunk = plan.chunk_shape[0]
        return [
            partial(
                read_chunk,
                sample_dir / F.KV / chunk,
                segments(c * per_chunk, (c + 1) * per_chunk),
                sample_id=sample_id,
                array=F.KV,
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
