"""Reliability: kills at random moments, bad inputs, determinism.

The fast tests run by default; ``-m long`` adds repeated SIGKILLs and the bad-input sweep, and the
session prints ``reliability: N kills survived, M samples lost, K bad inputs rejected``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpamayo_cache.errors import UserError
from alpamayo_cache.evaluate import EvalConfig
from alpamayo_cache.evaluate import run as evaluate
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.store import format as L
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.store.verify import verify
from alpamayo_cache.train import TrainConfig
from alpamayo_cache.train import run as train
from tests.conftest import RELIABILITY, precompute_cfg
from tests.test_store import _committed, _precompute_cmd, assert_same_features


def _train_cmd(store: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "alpamayo_cache", "train", str(store), "--run-dir", str(run_dir), "--device", "cpu",
        "--steps", "12", "--set", "save_every=3", "--set", "val_every=1000", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_killed_mid_epoch_resumes_exactly(tiny_store, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(tiny_store, full), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(tiny_store, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:  # mid-epoch, past a checkpoint
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(_train_cmd(tiny_store, killed, "--resume"), check=True, capture_output=True)
    assert _losses(killed) == _losses(full)
    RELIABILITY["kills survived"] += 1


def test_same_seed_same_losses_and_metrics(tiny_store, tmp_path):
    runs = [
        train(TrainConfig(store=tiny_store, run_dir=tmp_path / f"r{i}", steps=6, device="cpu", seed=7))
        for i in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    other = train(TrainConfig(store=tiny_store, run_dir=tmp_path / "r2", steps=6, device="cpu", seed=8))
    assert other.losses != runs[0].losses
    metrics = [
        evaluate(
            EvalConfig(
                store=tiny_store,
                checkpoints=(str(tmp_path / "r0"),),
                out_dir=tmp_path / f"e{i}",
                device="cpu",
                plots=False,
            )
        )
        for i in range(2)
    ]
    assert metrics[0]["overall"] == metrics[1]["overall"] and metrics[0]["paired"] == metrics[1]["paired"]


def test_empty_clip_list_is_refused(synthetic_data, tmp_path):
    empty = tmp_path / "clips.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(UserError, match="clip list is empty"):
        precompute(precompute_cfg(synthetic_data, tmp_path / "s", clips_file=empty))
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("not-a-clip\n")
    with pytest.raises(UserError, match="not-a-clip .* is not in the dataset"):
        precompute(precompute_cfg(synthetic_data, tmp_path / "s", clips_file=unknown))


@pytest.mark.long
def test_repeated_sigkill_during_precompute(synthetic_data, tiny_store, tmp_path):
    """SIGKILL precompute at 10 random moments (start-up, mid-sample, mid-write), resuming each time."""
    store = tmp_path / "store"
    rng = random.Random(0)
    kills = 0
    for _ in range(10):
        proc = subprocess.Popen(
            _precompute_cmd(synthetic_data, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        target = _committed(store) + rng.randint(1, 3)
        delay = rng.uniform(0.0, 0.05)
        deadline = time.time() + 120
        while proc.poll() is None and _committed(store) < target and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    result = precompute(precompute_cfg(synthetic_data, store, keyframes="stride:1.5"))
    assert verify(store).ok
    expected = len(StoreReader(tiny_store).sample_infos())
    got = len(StoreReader(store).sample_infos())
    assert result.written + result.skipped == expected == got
    assert_same_features(store, tiny_store)
    assert kills >= 8  # a few runs may finish their last samples before the kill lands
    RELIABILITY["kills survived"] += kills
    RELIABILITY["samples lost"] += expected - got


@pytest.mark.long
def test_bad_input_sweep(faulty_data, synthetic_data, tiny_store, tmp_path):
    """Every bad input gets its one-line message and nothing committed is lost."""
    before = sorted(p.name for p in (tiny_store / L.SAMPLES_DIR).iterdir())
    result = precompute(precompute_cfg(faulty_data, tmp_path / "faulty"))
    rejected = len(result.failed)  # missing camera, corrupt video, too short, NaN egomotion
    cases = [
        (
            lambda: precompute(
                precompute_cfg(synthetic_data, tmp_path / "a", camera_sets=("mask:camera_roof",))
            ),
            "unknown camera",
        ),
        (
            lambda: precompute(precompute_cfg(synthetic_data, tmp_path / "b", keyframes="sometimes")),
            "unknown keyframe policy",
        ),
        (lambda: precompute(precompute_cfg(tmp_path / "nowhere", tmp_path / "c")), "does not exist"),
        (
            lambda: precompute(precompute_cfg(synthetic_data, tiny_store, prompt_mode="reasoning")),
            "fingerprint",
        ),
        (
            lambda: train(TrainConfig(store=tmp_path / "nostore", run_dir=tmp_path / "r", device="cpu")),
            "does not exist",
        ),
        (
            lambda: train(TrainConfig(store=tiny_store, run_dir=tmp_path / "r", device="cpu", split="test")),
            "has no samples",
        ),
        (
            lambda: evaluate(
                EvalConfig(store=tiny_store, checkpoints=(str(tmp_path / "none"),), device="cpu")
            ),
            "--checkpoint .* does not exist",
        ),
    ]
    for fn, message in cases:
        with pytest.raises(UserError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)
        rejected += 1
    assert sorted(p.name for p in (tiny_store / L.SAMPLES_DIR).iterdir()) == before
    RELIABILITY["bad inputs rejected"] += rejected
