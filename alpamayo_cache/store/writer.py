"""Writing samples into the store with a commit protocol that survives a killed process.

A sample is written completely into ``staging/rank-<r>/<id>/`` and then renamed into ``samples/<id>/``.
The rename is atomic on a local filesystem, so a sample is either fully present or absent: killing
the writer at any moment loses at most the sample in flight, and the next run deletes what is left in
its staging folder. Each rank holds an exclusive lock, so two processes cannot write the same rank.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO

import numpy as np

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import layout as L


def _create_array(group, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
    from zarr.codecs import Crc32cCodec

    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks or data.shape,
        compressors=[Crc32cCodec()],
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},  # every chunk is written, so a missing file means damage
    )
    arr[...] = data


def open_root(root: Path, info: L.StoreInfo | None = None):
    """Open the store's root group; create it with ``info`` if absent, else check the fingerprint."""
    import zarr

    root = Path(root)
    marker = root / "zarr.json"
    if not marker.is_file():
        if info is None:
            raise UserError(
                f"{root} is not an alpamayo-cache store (no zarr.json): run `alpamayo-cache precompute` first"
            )
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / L.LOCKS_DIR / "root.lock", blocking=True):
            if not marker.is_file():
                group = zarr.open_group(str(root), mode="w")
                group.attrs[L.STORE_ATTR] = info.to_dict()
                for sub in (L.SAMPLES_DIR, L.STAGING_DIR, L.FAILURES_DIR):
                    (root / sub).mkdir(exist_ok=True)
    group = zarr.open_group(str(root), mode="r")
    found = group.attrs.get(L.STORE_ATTR)
    if found is None:
        raise UserError(f"{root} is a zarr group but not an alpamayo-cache store")
    stored = L.StoreInfo.from_dict(found)
    if stored.layout_version != L.LAYOUT_VERSION:
        raise UserError(
            f"store {root} has layout v{stored.layout_version}; this alpamayo-cache reads v{L.LAYOUT_VERSION}: "
            "re-run precompute into a new store"
        )
    if info is not None and stored.fingerprint != info.fingerprint:
        raise UserError(
            f"store {root} was made by {stored.model_name}/{stored.prompt_mode}/kv {stored.kv_dtype} "
            f"(fingerprint {stored.fingerprint}); this run is {info.model_name}/{info.prompt_mode}/kv {info.kv_dtype} "
            f"({info.fingerprint}): use another --store or the store's options"
        )
    return stored


class _locked:
    """An fcntl lock file held for the duration of a ``with`` block."""

    def __init__(self, path: Path, blocking: bool) -> None:
        self.path, self.blocking = path, blocking
        self.handle: IO[str] | None = None

    def __enter__(self) -> _locked:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        flags = fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.handle, flags)
        except BlockingIOError:
            self.handle.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


class StoreWriter:
    """Writes committed samples for one rank of a (possibly multi-process) precompute."""

    def __init__(self, root: Path, info: L.StoreInfo, rank: int = 0) -> None:
        self.root = Path(root)
        self.rank = rank
        self.info = open_root(self.root, info)
        self._lock = _locked(self.root / L.LOCKS_DIR / f"rank-{rank}.lock", blocking=False)
        try:
            self._lock.__enter__()
        except BlockingIOError:
            raise UserError(
                f"another precompute is already writing rank {rank} of {self.root}: wait for it, or split the work "
                "with --rank/--world-size (or accelerate launch / torchrun)"
            ) from None
        self.staging = self.root / L.STAGING_DIR / f"rank-{rank}"
        self.removed_partial = self._clean_staging()

    def close(self) -> None:
        self._lock.__exit__()

    def _clean_staging(self) -> int:
        """Delete samples a killed run left half-written (never committed, so nothing is lost)."""
        if not self.staging.is_dir():
            self.staging.mkdir(parents=True)
            return 0
        leftovers = list(self.staging.iterdir())
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return len(leftovers)

    def committed(self) -> set[str]:
        return {p.name for p in (self.root / L.SAMPLES_DIR).iterdir() if p.is_dir()}

    def write(self, info: L.SampleInfo, arrays: dict[str, np.ndarray]) -> None:
        """Write all arrays of a sample and commit it (rename into samples/)."""
        import zarr

        target = self.root / L.SAMPLES_DIR / info.sample_id
        if target.exists():
            raise UserError(f"sample {info.sample_id} is already committed in {self.root}")
        tmp = self.staging / info.sample_id
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            group = zarr.open_group(str(tmp), mode="w", attributes={"sample": info.to_dict()})
            for name, data in arrays.items():
                chunks = (1, *data.shape[1:]) if name == L.KV else None  # one chunk per layer
                _create_array(group, name, data, chunks)
            os.rename(tmp, target)  # the commit
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"disk full while writing sample {info.sample_id} into {self.root}: free space and re-run; "
                    "committed samples are kept and the run resumes after them"
                ) from exc
            raise

    def record_failure(self, key: str, reason: str) -> None:
        path = self.root / L.FAILURES_DIR / f"rank-{self.rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"key": key, "reason": reason, "time": time.time()}) + "\n")


def read_failures(root: Path) -> dict[str, str]:
    """Latest reason per failed clip/sample, over all ranks."""
    out: dict[str, str] = {}
    folder = Path(root) / L.FAILURES_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            out[row["key"]] = row["reason"]
    return out
