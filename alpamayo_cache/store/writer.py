"""Writing samples into the store with a commit protocol that survives a killed process.

A sample is written completely into ``staging/rank-<r>/<id>/`` and then renamed into ``samples/<id>/``.
The rename is atomic on a local filesystem, so a sample is either fully present or absent: killing
the writer at any moment loses at most the sample in flight, and the next run deletes what is left in
its staging folder. Each rank holds an exclusive lock, so two processes cannot write the same rank.

Creating a store is resumable from any partial state: the folders come first and the root's
``zarr.json`` (which makes it a store) is written last, atomically. A folder that holds anything else
is never adopted.
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
from alpamayo_cache.store import format as F


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def open_or_create(root: Path, info: F.StoreInfo) -> F.StoreInfo:
    """Open the store at ``root`` for writing with ``info``'s fingerprint, creating it if needed."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--store {root} is a file: pass a folder for the store")
    if (root / "zarr.json").is_file():
        stored = F.read_info(root)
        if stored.fingerprint != info.fingerprint:
            raise UserError(
                f"store {root} was made by {stored.model_name}/{stored.prompt_mode}/kv {stored.kv_dtype} "
                f"(fingerprint {stored.fingerprint}); this run is {info.model_name}/{info.prompt_mode}/kv "
                f"{info.kv_dtype} ({info.fingerprint}): use another --store or the store's options"
            )
    elif root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in F.ROOT_ENTRIES)
        if foreign:
            raise UserError(
                f"--store {root} is a folder with other files ({foreign[0]}, ...) and no store in it: "
                "pass a new or empty folder"
            )
        if F.committed_samples(root):
            raise UserError(
                f"{root} holds samples but no zarr.json: restore zarr.json from a copy, or use a new --store"
            )
    for sub in (F.SAMPLES_DIR, F.STAGING_DIR, F.FAILURES_DIR, F.LOCKS_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").is_file():
        with _Lock(root / F.LOCKS_DIR / "root.lock", blocking=True):
            if not (root / "zarr.json").is_file():
                F.write_info(root, info)  # last: only now is the folder a store
    return F.read_info(root)


class _Lock:
    """An fcntl lock file held for the duration of a ``with`` block (released if the process dies)."""

    def __init__(self, path: Path, blocking: bool) -> None:
        self.path, self.blocking = path, blocking
        self.handle: IO[str] | None = None

    def __enter__(self) -> _Lock:
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
            self.handle = None


class StoreWriter:
    """Writes committed samples for one rank of a (possibly multi-process) precompute."""

    def __init__(self, root: Path, info: F.StoreInfo, rank: int = 0) -> None:
        self.root = Path(root)
        self.rank = rank
        self.info = open_or_create(self.root, info)
        self._lock = _Lock(self.root / F.LOCKS_DIR / f"rank-{rank}.lock", blocking=False)
        try:
            self._lock.__enter__()
        except BlockingIOError:
            raise UserError(
                f"another precompute is already writing rank {rank} of {self.root}: wait for it, or split the work "
                "with --rank/--world-size (or accelerate launch / torchrun)"
            ) from None
        self.staging = self.root / F.STAGING_DIR / f"rank-{rank}"
        self.removed_partial = self._clean_staging()

    def close(self) -> None:
        self._lock.__exit__()

    def _clean_staging(self) -> int:
        """Delete samples a killed run left half-written (never committed, so nothing is lost)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        leftovers = list(self.staging.iterdir())
        for path in leftovers:
            shutil.rmtree(F.inside(self.staging, path), ignore_errors=True)
        return len(leftovers)

    def write(self, info: F.SampleInfo, arrays: dict[str, np.ndarray]) -> None:
        """Write all arrays of a sample and commit it (rename into samples/)."""
        import zarr

        F.check_id(info.sample_id, "sample id")
        target = F.inside(self.root, self.root / F.SAMPLES_DIR / info.sample_id)
        if target.exists():
            raise UserError(f"sample {info.sample_id} is already committed in {self.root}")
        tmp = F.inside(self.staging, self.staging / info.sample_id)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            group = zarr.open_group(str(tmp), mode="w", attributes={"sample": info.to_dict()})
            for name, data in arrays.items():
                chunks = (1, *data.shape[1:]) if name == F.KV else None  # one chunk per layer
                F.create_array(group, name, data, chunks)
            os.rename(tmp, target)  # the commit
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(exc):
                raise UserError(
                    f"disk full while writing sample {info.sample_id} into {self.root}: free space and re-run; "
                    "committed samples are kept and the run resumes after them"
                ) from exc
            raise

    def record_failure(self, key: str, reason: str) -> None:
        path = self.root / F.FAILURES_DIR / f"rank-{self.rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"key": key, "reason": reason, "time": time.time()}) + "\n")


def read_failures(root: Path) -> dict[str, str]:
    """Latest reason per failed clip/sample, over all ranks."""
    out: dict[str, str] = {}
    folder = Path(root) / F.FAILURES_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("rank-*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                out[str(row["key"])] = str(row["reason"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill
    return out
