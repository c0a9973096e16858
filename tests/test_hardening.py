"""Hostile or unlucky inputs (issue D1-D19): each is refused with one line, loses nothing, and touches
nothing outside the store or run folder the user named. Counted in the reliability summary line."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from alpamayo_cache.cli import app
from alpamayo_cache.configs import EvalConfig, TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.evaluate import run as evaluate
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.store import format as F
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.store.verify import repair, verify
from alpamayo_cache.train import run as train
from alpamayo_cache.train.checkpoints import RunLock
from tests.conftest import RELIABILITY, precompute_cfg

# The long suite (`pytest -m long`, run by .ci/run) holds every hardening case; its summary line counts them.
pytestmark = pytest.mark.long
runner = CliRunner()


def rejected(fn, match: str) -> UserError:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value), "an error is one line"
    RELIABILITY["bad inputs rejected"] += 1
    return info.value


def cli_rejects(args: list[str], match: str) -> None:
    """Exit status 2, one line 'error: ...' matching ``match``, no traceback."""
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    import re

    assert re.search(match, " ".join(lines[-1:])), result.output
    RELIABILITY["bad inputs rejected"] += 1


def tcfg(store: Path, run_dir: Path, **kw) -> TrainConfig:
    kw.setdefault("device", "cpu")
    kw.setdefault("val_every", 1000)
    return TrainConfig(store=store, run_dir=run_dir, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _EvilIds:
    """A dataset whose index holds ids that would escape the store if they were used as paths."""

    def __init__(self, inner, extra: list[str]) -> None:
        self.inner, self.extra, self.description = inner, extra, inner.description

    def clip_ids(self) -> list[str]:
        return self.inner.clip_ids()[:1] + self.extra

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_d1_clip_ids_are_data_never_paths(synthetic_data, tmp_path, monkeypatch):
    import alpamayo_cache.precompute_plan as stage  # where precompute opens its data
    from alpamayo_cache.data.source import open_source

    evil = ["../../../escape", str(tmp_path / "absolute"), "a" * 300, "ok/../../x"]
    monkeypatch.setattr(stage, "open_source", lambda *a, **k: _EvilIds(open_source(*a, **k), evil))
    store = tmp_path / "work" / "store"
    result = precompute(precompute_cfg(synthetic_data, store))
    assert result.written == 1
    assert sum("not a safe name" in reason for reason in result.failed.values()) == len(evil)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and sorted(
        p.name for p in (tmp_path / "work").iterdir()
    ) == ["store"]
    RELIABILITY["bad inputs rejected"] += len(evil)


def test_d3_overwrite_deletes_only_run_folders(tiny_store, tmp_path):
    store = shutil.copytree(tiny_store, tmp_path / "store")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    for target in (store, user):
        before = snapshot(target)
        rejected(
            lambda t=target: train(tcfg(tiny_store, t, steps=1, overwrite=True)), "not made by alpamayo-cache"
        )
        assert snapshot(target) == before
    assert verify(store).ok


def _poison(store: Path, sample_id: str) -> None:
    """NaN in a committed sample's K/V, written through zarr so the checksums stay valid."""
    arr = zarr.open_group(str(store / F.SAMPLES_DIR / sample_id), mode="r+")[F.KV]
    data = arr[0:1]
    data.reshape(-1)[3] = np.nan
    arr[0:1] = data


def test_d2_non_finite_features_never_train_or_evaluate(tiny_store, tmp_path):
    store = shutil.copytree(tiny_store, tmp_path / "store")
    reader = StoreReader(store)
    bad = reader.select("train")[0]
    _poison(store, bad)
    rejected(lambda: train(tcfg(store, tmp_path / "run", steps=20, micro_batch=8)), f"non-finite.*{bad}")
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
    rejected(lambda: evaluate(EvalConfig(store=store, split="all", device="cpu", num_samples=1)), bad)
    assert bad in verify(store).problems


def test_d4_one_process_per_run_folder(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    train(tcfg(tiny_store, run_dir, steps=2))
    lock = RunLock(run_dir, "train")
    try:
        rejected(lambda: train(tcfg(tiny_store, run_dir, steps=2, resume=True)), "in use by train")
        rejected(
            lambda: evaluate(
                EvalConfig(store=tiny_store, checkpoints=(str(run_dir),), device="cpu", num_samples=1)
            ),
            "in use by",
        )
    finally:
        lock.release()
    train(tcfg(tiny_store, run_dir, steps=2, resume=True))  # free again once the holder is gone


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_d5_damaged_checkpoints_are_caught(tiny_store, tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(tcfg(tiny_store, run_dir, steps=4, save_every=2, stop_after=4))
    newest = run_dir / "checkpoints" / "step-000004"
    _flip(newest / "head.safetensors")
    head = str(newest / "head.safetensors")
    rejected(lambda: evaluate(EvalConfig(store=tiny_store, checkpoints=(head,), device="cpu")), "damaged")
    _flip(newest / "head.safetensors")  # heal it, damage the trainer state instead
    _flip(newest / "trainer_state.pt")
    result = train(tcfg(tiny_store, run_dir, steps=4, save_every=2, resume=True))
    assert "step-000004 is damaged" in caplog.text and result.step == 4 and len(result.losses) == 2
    (run_dir / "checkpoints" / "latest").write_text("../../../etc")  # a garbage pointer
    result = train(tcfg(tiny_store, run_dir, steps=4, save_every=2, resume=True))
    assert result.losses == []  # resumed from the newest intact checkpoint: step 4, nothing left to do


def test_d6_repair_quarantines_and_precompute_remakes(synthetic_data, tiny_store, tmp_path):
    store = shutil.copytree(tiny_store, tmp_path / "store")
    ids = F.committed_samples(store)
    (store / F.SAMPLES_DIR / ids[0] / F.KV / "c.1.0.0.0.0").unlink()
    _flip(store / F.SAMPLES_DIR / ids[1] / F.KV / "c.0.0.0.0.0")
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and f"alpamayo-cache repair {store}" in result.output
    assert sorted(repair(store)) == sorted(ids[:2])
    assert sorted(p.name for p in (store / F.QUARANTINE_DIR).iterdir()) == sorted(ids[:2])
    again = precompute(precompute_cfg(synthetic_data, store, keyframes="stride:1.5"))
    assert again.written == 2 and verify(store).ok


def test_d7_half_made_store_resumes_and_foreign_folder_is_refused(synthetic_data, tmp_path):
    store = tmp_path / "store"
    for sub in (F.SAMPLES_DIR, F.LOCKS_DIR):  # killed before zarr.json was written
        (store / sub).mkdir(parents=True)
    assert precompute(precompute_cfg(synthetic_data, store, limit=2)).written > 0
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    rejected(lambda: precompute(precompute_cfg(synthetic_data, foreign, limit=1)), "other files")
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_d8_disk_full_keeps_the_last_good_checkpoint(tiny_store, tmp_path, monkeypatch):
    import alpamayo_cache.train.checkpoints as C

    real_save, calls = torch.save, {"n": 0}

    def full(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(C.torch, "save", full)
    run_dir = tmp_path / "run"
    rejected(lambda: train(tcfg(tiny_store, run_dir, steps=4, save_every=2)), "disk full.*kept step-000002")
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-000002"]


def test_d8_disk_full_in_eval_leaves_nothing(tiny_store, tmp_path, monkeypatch):
    import alpamayo_cache.evaluate as stage

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage.np, "savez", full)
    out = tmp_path / "eval"
    rejected(
        lambda: evaluate(EvalConfig(store=tiny_store, out_dir=out, device="cpu", num_samples=1)), "disk full"
    )
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_d8_d14_to_d19_one_line_errors(synthetic_data, tiny_store, tmp_path):
    store = str(tiny_store)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ steps: ")
    cli_rejects(["train", store, "--config", str(bad_json)], "not valid JSON")
    cli_rejects(["train", str(a_file)], "is a file")
    cli_rejects(["train", store, "--run-dir", str(a_file)], "is a file")
    cli_rejects(["eval", store, "--out", str(a_file)], "is a file")
    cli_rejects(["train", store, "--set", "steps=ten"], "steps must be an integer")
    cli_rejects(["train", store, "--set", "lr=fast"], "lr must be a finite number")
    cli_rejects(["train", store, "--set", "save_every=0"], "save-every must be at least 1")
    cli_rejects(["train", store, "--steps", "-3"], "steps must be at least 1")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    cli_rejects(
        ["train", store, "--init", str(broken), "--run-dir", str(tmp_path / "r1")], "damaged|not a readable"
    )
    binary = tmp_path / "clips.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    cli_rejects(
        ["precompute", "--data", str(synthetic_data), "--store", str(tmp_path / "s"), "--clips", str(binary)],
        "not a text file",
    )
    truncated = shutil.copytree(tiny_store, tmp_path / "truncated")
    (truncated / "zarr.json").write_text((truncated / "zarr.json").read_text()[:40])
    cli_rejects(["train", str(truncated)], "unreadable")
    newer = shutil.copytree(tiny_store, tmp_path / "newer")
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"][F.STORE_ATTR]["layout_version"] = 99
    (newer / "zarr.json").write_text(json.dumps(meta))
    cli_rejects(["eval", str(newer)], "layout v99")
    older = shutil.copytree(tiny_store, tmp_path / "older")
    meta["attributes"][F.STORE_ATTR]["layout_version"] = 1
    (older / "zarr.json").write_text(json.dumps(meta))
    cli_rejects(["train", str(older)], "older alpamayo-cache.*re-run precompute into a new --store")
    data = shutil.copytree(synthetic_data, tmp_path / "data", symlinks=True)
    index = next(data.rglob("clip_index.parquet"))
    index.write_bytes(index.read_bytes()[:50])
    cli_rejects(["precompute", "--data", str(data), "--store", str(tmp_path / "s2")], "unreadable index file")


def test_d9_egomotion_gap_skips_the_keyframe(tmp_path):
    import pandas as pd

    from alpamayo_cache.data.synthetic import write_clip_folder

    root = write_clip_folder(tmp_path / "clips", n_clips=1, seed=0) or tmp_path / "clips"
    table = next(Path(root).rglob("egomotion.parquet"))
    df = pd.read_parquet(table)
    df = df[(df["timestamp_us"] < 9_000_000) | (df["timestamp_us"] > 10_500_000)]  # 1.5 s without poses
    df.to_parquet(table)
    result = precompute(precompute_cfg(Path(root), tmp_path / "store", keyframes="stride:1"))
    gaps = [r for r in result.failed.values() if r.startswith("egomotion gap")]
    assert gaps and "no poses for 1.60 s from 8.95 s" in gaps[0]  # rows are 50 ms apart
    assert result.written > 0  # keyframes whose windows avoid the gap are still made
    RELIABILITY["bad inputs rejected"] += 1


def test_d10_resume_with_changed_settings(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    train(tcfg(tiny_store, run_dir, steps=4, save_every=2, stop_after=2))
    err = rejected(
        lambda: train(tcfg(tiny_store, run_dir, steps=4, lr=1e-2, micro_batch=2, resume=True)), "changed"
    )
    assert "lr" in str(err) and "micro_batch" in str(err)
    train(tcfg(tiny_store, run_dir, steps=4, save_every=2, lr=1e-2, resume=True, resume_with_changes=True))
    history = (run_dir / "config_history.jsonl").read_text()
    assert '"lr"' in history


def test_d11_disk_plan_counts_every_byte(synthetic_data, tmp_path):
    store = tmp_path / "store"
    planned = precompute(precompute_cfg(synthetic_data, store, limit=3, dry_run=True)).expected_bytes
    precompute(precompute_cfg(synthetic_data, store, limit=3))
    used = sum(p.stat().st_blocks * 512 for p in (store / F.SAMPLES_DIR).rglob("*"))  # as du counts
    assert 0.9 < planned / used < 1.1, (planned, used)


def test_d12_corrupt_validation_sample_is_skipped(tiny_store, tmp_path, caplog):
    store = shutil.copytree(tiny_store, tmp_path / "store")
    bad = StoreReader(store).select("val")[0]
    _flip(store / F.SAMPLES_DIR / bad / F.KV / "c.0.0.0.0.0")
    result = train(tcfg(store, tmp_path / "run", steps=2, val_every=1, save_every=2))
    assert result.step == 2 and result.checkpoint is not None and len(result.val_losses) == 2
    assert f"validation skips {bad}" in caplog.text


def test_checkpoint_retention_keeps_newest_and_best(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tcfg(tiny_store, run_dir, steps=8, save_every=2, val_every=2, keep_checkpoints=2))
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    best = min(result.val_losses, key=lambda x: x[1])[0]
    assert kept == sorted({f"step-{s:06d}" for s in (6, 8, best)})


def test_d11_disk_plan_at_real_size(tmp_path):
    """One real-size sample (L = 2,993, 36 layers x 8 kv-heads x 128, bf16) written by the store's own
    writer takes what the plan says, within 10%."""
    from alpamayo_cache.config import REAL
    from alpamayo_cache.store.writer import StoreWriter

    t, length = REAL.text, 2993
    info = F.StoreInfo(
        F.LAYOUT_VERSION, "real", "test", {}, "traj-only", "bf16", "bf16", "sdpa", fingerprint="x"
    )
    writer = StoreWriter(tmp_path / "store", info)
    rng = np.random.default_rng(0)
    arrays = {
        F.KV: rng.integers(0, 2**16, (t.num_layers, 2, t.num_kv_heads, length, t.head_dim), dtype=np.uint16),
        F.HIDDEN: np.zeros(t.hidden_size, np.float32),
        F.HIST_XYZ: np.zeros((16, 3), np.float32),
        F.HIST_ROT: np.zeros((16, 3, 3), np.float32),
        F.FUT_XYZ: np.zeros((64, 3), np.float32),
        F.FUT_ROT: np.zeros((64, 3, 3), np.float32),
        F.ACTION: np.zeros((64, 2), np.float32),
        F.THUMBS: np.zeros((4, *F.THUMB_SIZE, 3), np.uint8),
    }
    sample = F.SampleInfo("s0", "c", 0, "default", [], "train", length, -2592)
    writer.write(sample, arrays)
    writer.close()
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "store" / F.SAMPLES_DIR).rglob("*"))
    planned = F.sample_bytes(length, t.num_layers, t.num_kv_heads, t.head_dim, "bf16", t.hidden_size, 4)
    assert 0.9 < planned / used < 1.1, (planned, used)
    assert abs(planned - 441e6) / 441e6 < 0.01
