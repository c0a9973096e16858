"""``verify``, ``repair`` and ``info``: check every committed sample, quarantine damage, summarise."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.runtime import log
from alpamayo_cache.store import format as F
from alpamayo_cache.store.quant import INT_BITS, code_width
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


def _check_sample(reader: StoreReader, sample_id: str, text_cfg: dict) -> F.SampleInfo:
    s = reader.read(sample_id)  # int8/int4 scale arrays are shape-checked against L by the reader
    width = code_width(text_cfg["head_dim"], reader.info.kv_dtype)
    expected = (reader.info.stored_layers, text_cfg["num_kv_heads"], s.info.length, width)
    if tuple(s.keys.shape) != expected:
        raise UserError(f"kv shape {tuple(s.keys.shape)} != {expected}")
    if (
        reader.info.kv_dtype in INT_BITS
        and s.k_quant is not None
        and s.k_quant.shape[-1] != text_cfg["head_dim"]
    ):
        raise UserError(
            f"k_quant shape {tuple(s.k_quant.shape)} does not match head dim {text_cfg['head_dim']}"
        )
    if s.prompt_hidden is not None:
        if tuple(s.prompt_hidden.shape) != (s.info.length, text_cfg["hidden_size"]):
            raise UserError(f"prompt_hidden shape {tuple(s.prompt_hidden.shape)} is not (L, hidden)")
        if not torch.isfinite(s.prompt_hidden.float()).all():
            raise UserError("prompt_hidden has non-finite values")
    for name in ("hidden", "hist_xyz", "hist_rot", "fut_xyz", "fut_rot", "action", "k_quant", "v_quant"):
        value = getattr(s, name)
        if value is not None and not torch.isfinite(value).all():
            raise UserError(f"{name} has non-finite values")
    for name in ("keys", "values"):
        if not torch.isfinite(getattr(s, name).float()).all():
            raise UserError(f"kv {name} have non-finite values")
    reader.thumbnails(sample_id)
    reader.front_image(sample_id)
    return s.info


def verify(root: Path) -> VerifyReport:
    """Read every array of every committed sample (crc32c-checked), check shapes, finiteness and
    that each (clip, t0, camera set) appears once."""
    reader = StoreReader(root)
    text_cfg = reader.info.model_config["text"]
    report = VerifyReport()
    seen: dict[tuple, str] = {}
    for sample_id in F.committed_samples(root):
        report.checked += 1
        try:
            info = _check_sample(reader, sample_id, text_cfg)
            key = (info.clip_id, info.t0_us, info.camera_set)
            if key in seen:
                raise UserError(f"duplicate of {seen[key]}")
            seen[key] = sample_id
        except UserError as exc:
            report.problems[sample_id] = str(exc)
    staging = Path(root) / F.STAGING_DIR
    report.staging_leftovers = (
        sum(1 for rank in staging.glob("rank-*") for _ in rank.iterdir()) if staging.is_dir() else 0
    )
    return report


def print_report(report: VerifyReport, root: Path) -> None:
    for sample_id, problem in report.problems.items():
        print(f"BAD {sample_id}: {problem}")
    print(
        f"verify: {report.checked} samples checked, {len(report.problems)} bad, "
        f"{report.staging_leftovers} uncommitted leftovers (removed by the next precompute)"
    )
    if report.problems:
        print(
            f"fix: `alpamayo-cache repair {root}` moves the bad samples to quarantine/, then re-run the same "
            "precompute command: it makes exactly those samples again"
        )


def repair(root: Path) -> list[str]:
    """Move every sample that fails verification into ``quarantine/`` (nothing is deleted)."""
    report = verify(root)
    quarantine = Path(root) / F.QUARANTINE_DIR
    moved = []
    for sample_id, problem in report.problems.items():
        quarantine.mkdir(exist_ok=True)
        target = F.inside(root, quarantine / sample_id)
        suffix = 1
        while target.exists():  # an earlier repair quarantined the same id: keep both
            target = quarantine / f"{sample_id}.{suffix}"
            suffix += 1
        os.rename(Path(root) / F.SAMPLES_DIR / sample_id, target)
        log.info(f"quarantined {sample_id}: {problem}")
        moved.append(sample_id)
    print(
        f"repair: {report.checked} samples checked, {len(moved)} moved to {quarantine}"
        + ("; re-run the same precompute command to make them again" if moved else "")
    )
    return moved


def summary(root: Path) -> dict:
    reader = StoreReader(root)
    infos = reader.sample_infos()
    size = sum(f.stat().st_size for f in (Path(root) / F.SAMPLES_DIR).rglob("*") if f.is_file())
    lengths = [i.length for i in infos.values()]
    return {
        "store": str(root),
        "layout_version": reader.info.layout_version,
        "fingerprint": reader.info.fingerprint,
        "model": reader.info.model_name,
        "model_identity": reader.info.model_identity,
        "prompt_mode": reader.info.prompt_mode,
        "kv_dtype": reader.info.kv_dtype,
        "vlm_from_layer": reader.info.vlm_from_layer,
        "samples": len(infos),
        "clips": len({i.clip_id for i in infos.values()}),
        "by_split": dict(Counter(i.split for i in infos.values())),
        "by_camera_set": dict(Counter(i.camera_set for i in infos.values())),
        "prefix_length": {"min": min(lengths), "max": max(lengths)} if lengths else {},
        "release": reader.info.model_config.get("release", "alpamayo-r1"),
        "with_route": sum(1 for i in infos.values() if i.has_route),
        "bytes": size,
        "failures": len(read_failures(root)),
    }
