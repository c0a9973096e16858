"""Checksums of written files, so a flipped byte in a checkpoint is caught before it is trusted.

A folder that holds files worth protecting (a training checkpoint) gets ``checksums.json``:
``{file name: {"crc32c": hex, "bytes": n}}``. crc32c (hardware-accelerated, >10 GB/s) is for damage
detection, not for adversaries; the size catches truncation cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alpamayo_cache.errors import UserError

CHECKSUMS = "checksums.json"
_PIECE = 1 << 24


def crc32c_file(path: Path) -> str:
    import google_crc32c

    crc = 0
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(_PIECE):  # bytes: google_crc32c hashes them without holding the GIL
            crc = google_crc32c.extend(crc, piece)
    return f"{crc:08x}"


def write_checksums(folder: Path, names: list[str]) -> None:
    """Record the checksum of each named file of ``folder`` (written last, atomically)."""
    folder = Path(folder)
    table = {n: {"crc32c": crc32c_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}
    tmp = folder / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, folder / CHECKSUMS)


def _table(folder: Path) -> dict | None:
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged table vouches for nothing


def folder_problems(folder: Path) -> list[str]:
    """What is wrong with a checksummed folder ([] when every listed file is intact)."""
    table = _table(folder)
    if table is None:
        return [f"{Path(folder) / CHECKSUMS} is missing"]
    if not table:
        return [f"{Path(folder) / CHECKSUMS} is damaged"]
    problems = []
    for name, entry in table.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {entry.get('bytes')} were written")
        elif crc32c_file(path) != entry.get("crc32c"):
            problems.append(f"{name} fails its checksum (damaged bytes)")
    return problems


def verify_checksum(path: Path) -> None:
    """Refuse ``path`` if its folder's checksum table lists it with other contents (no table: no check)."""
    path = Path(path)
    table = _table(path.parent)
    if table is None:
        return
    entry = table.get(path.name)
    if entry is None:
        if not table:
            raise UserError(f"{path.parent / CHECKSUMS} is damaged: the checkpoint cannot be trusted")
        return
    if path.stat().st_size != entry.get("bytes") or crc32c_file(path) != entry.get("crc32c"):
        raise UserError(
            f"{path} is damaged (checksum mismatch): use another checkpoint of the run, or re-train"
        )
