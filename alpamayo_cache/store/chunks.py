"""Chunk files of the store, read directly: crc32c-checked ``os.preadv`` into the caller's memory.

The store format stays as the writer makes it (zarr v3, codec chain [bytes little-endian, crc32c], no
compression, one chunk file per layer for ``kv``, one chunk for every other array). Such a chunk file is
the chunk's raw little-endian bytes in C order followed by 4 bytes: the little-endian crc32c (Castagnoli) of
everything before them. ``read_chunk`` reads a file with ``os.preadv`` in ~1 MiB pieces directly into the
caller's memory, scattered where the caller wants it (K of a layer here, V there, one piece per head when
the batch is padded), and extends the crc over each piece while it is still in the core's cache.
``chunk_plan`` says whether an array is such a plain chunk grid; anything else is read through zarr.

GIL, checked in the sources: ``os.preadv`` releases it for the system call. google_crc32c 1.9's ``extend`` and
``value`` release it only for a ``bytes`` object of >= 1 MiB (``_crc32c.c``: ``PyBytes_Check``), never for
numpy/torch memory, so two threads checksumming buffers would take turns. We therefore call the same C
function, ``crc32c_extend`` of the libcrc32c that the google_crc32c wheel bundles, through ctypes (which
drops the GIL for the call); where that library is not found, ``google_crc32c.extend`` is used.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.store.format import CorruptSample

PIECE = 1 << 20  # bytes per preadv call: fits the 2 MiB L2 of a core, so the crc pass reads from cache
CRC_BYTES = 4
_NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_NUMERIC |= {"float16", "float32", "float64"}


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


def corrupt_sample(sample_id: str, problem: str) -> CorruptSample:
    return CorruptSample(
        f"sample {sample_id}: {problem}; run `alpamayo-cache repair` on the store and re-run precompute"
    )


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
        return corrupt_sample(sample_id, f"{array} chunk {Path(path).name} {problem}")

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
