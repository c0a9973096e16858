"""``verify`` and ``info``: check every committed sample and summarise a store."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import layout as L
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.store.writer import read_failures


@dataclass
class VerifyReport:
    checked: int = 0
    problems: dict[str, str] = field(default_factory=dict)
    staging_leftovers: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: Path) -> VerifyReport:
    """Read every array of every committed sample (crc32c-checked), check shapes, finiteness and
    that each (clip, t0, camera set) appears once."""
    reader = StoreReader(root)
    store = reader.info
    cfg = store.model_config["text"]
    report = VerifyReport()
    seen: dict[tuple, str] = {}
    for sample_id in sorted(p.name for p in (Path(root) / L.SAMPLES_DIR).iterdir() if p.is_dir()):
        report.checked += 1
        try:
            s = reader.read(sample_id)
            expected = (cfg["num_layers"], cfg["num_kv_heads"], s.info.length, cfg["head_dim"])
            if tuple(s.keys.shape) != expected:
                raise UserError(f"kv shape {tuple(s.keys.shape)} != {expected}")
            for name in ("hidden", "hist_xyz", "hist_rot", "fut_xyz", "fut_rot", "action"):
                if not np.isfinite(getattr(s, name).numpy()).all():
                    raise UserError(f"{name} has non-finite values")
            if not (s.keys.float().isfinite().all() and s.values.float().isfinite().all()):
                raise UserError("kv has non-finite values")
            reader.thumbnails(sample_id)
            key = (s.info.clip_id, s.info.t0_us, s.info.camera_set)
            if key in seen:
                raise UserError(f"duplicate of {seen[key]}")
            seen[key] = sample_id
        except UserError as exc:
            report.problems[sample_id] = str(exc)
    staging = Path(root) / L.STAGING_DIR
    report.staging_leftovers = (
        sum(1 for rank in staging.glob("rank-*") for _ in rank.iterdir()) if staging.is_dir() else 0
    )
    return report


def summary(root: Path) -> dict:
    reader = StoreReader(root)
    infos = reader.sample_infos()
    size = sum(f.stat().st_size for f in (Path(root) / L.SAMPLES_DIR).rglob("*") if f.is_file())
    lengths = [i.length for i in infos.values()]
    return {
        "store": str(root),
        "layout_version": reader.info.layout_version,
        "fingerprint": reader.info.fingerprint,
        "model": reader.info.model_name,
        "model_identity": reader.info.model_identity,
        "prompt_mode": reader.info.prompt_mode,
        "kv_dtype": reader.info.kv_dtype,
        "samples": len(infos),
        "clips": len({i.clip_id for i in infos.values()}),
        "by_split": dict(Counter(i.split for i in infos.values())),
        "by_camera_set": dict(Counter(i.camera_set for i in infos.values())),
        "prefix_length": {"min": min(lengths), "max": max(lengths)} if lengths else {},
        "bytes": size,
        "failures": len(read_failures(root)),
    }
