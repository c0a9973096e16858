"""Metrics on hand-computed trajectories, and the eval stage on the tiny store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alpamayo_cache import metrics as M
from alpamayo_cache.evaluate import EvalConfig, run, sample_noise
from alpamayo_cache.model.action_space import yaw_to_rotation
from alpamayo_cache.train import TrainConfig
from alpamayo_cache.train import run as train

W = 64


def straight(speed: float = 10.0, lateral: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(1, W + 1) * 0.1
    xyz = np.stack([speed * t, np.full(W, lateral), np.zeros(W)], axis=-1)
    return xyz, np.broadcast_to(np.eye(3), (W, 3, 3)).copy()


def test_identical_prediction_scores_zero():
    gt, rot = straight()
    m = M.sample_metrics(gt[None], rot[None], gt, rot)
    for key in ("min_ade", "ade", "min_fde", "corner_distance", "lateral_error_6.4s", "heading_error_deg"):
        assert m[key] == pytest.approx(0.0, abs=1e-9)
    assert m["gt_turn"] == 0.0


def test_known_lateral_offset():
    gt, rot = straight()
    pred, _ = straight(lateral=1.5)
    m = M.sample_metrics(pred[None], rot[None], gt, rot)
    assert m["min_ade"] == pytest.approx(1.5)
    assert m["min_fde"] == pytest.approx(1.5)
    assert m["min_ade/by_t=0.5"] == pytest.approx(1.5)
    assert m["corner_distance"] == pytest.approx(1.5)  # every corner shifted by the same 1.5 m
    assert m["lateral_error_3s"] == pytest.approx(1.5) and m["pred_lateral_3s"] == pytest.approx(1.5)


def test_best_of_k_is_chosen_on_the_full_horizon():
    gt, rot = straight()
    # Sample 0: perfect for 3 s, then 4 m off. Sample 1: 1 m off everywhere.
    late = gt.copy()
    late[30:, 1] = 4.0
    steady, _ = straight(lateral=1.0)
    pred = np.stack([late, steady])
    m = M.sample_metrics(pred, np.stack([rot, rot]), gt, rot)
    ade_late = 4.0 * 34 / 64
    assert m["min_ade"] == pytest.approx(min(ade_late, 1.0))  # 1.0 < 2.125: sample 1 wins
    assert m["best_sample"] == 1.0
    assert m["min_ade/by_t=3.0"] == pytest.approx(1.0)  # the chosen sample's value ...
    assert m["min_ade_reselect/by_t=3.0"] == pytest.approx(0.0)  # ... vs re-chosen at 3 s
    assert m["ade"] == pytest.approx(ade_late)  # sample 0
    assert m["min_fde"] == pytest.approx(1.0)


def test_turn_predicted_as_straight():
    t = np.arange(1, W + 1) * 0.1
    yaw = np.radians(45.0) * t / t[-1]
    gt = np.stack([10 * t, np.cumsum(np.sin(yaw)), np.zeros(W)], axis=-1)
    gt_rot = yaw_to_rotation(__import__("torch").tensor(yaw)).numpy()
    pred, rot = straight()
    m = M.sample_metrics(pred[None], rot[None], gt, gt_rot)
    assert m["gt_turn"] == 1.0 and m["turn_predicted_straight"] == 1.0
    assert m["heading_error_deg"] == pytest.approx(45.0)
    agg = M.aggregate([m, M.sample_metrics(gt[None], gt_rot[None], gt, gt_rot)])
    assert agg["turns_predicted_straight_share"] == pytest.approx(0.5)


def test_paired_delta_interval():
    base = np.array([2.0, 3.0, 4.0, 5.0] * 10)
    better = base - 1.0
    d = M.paired_delta(better, base)
    assert d["mean"] == pytest.approx(-1.0) and d["win_rate"] == 1.0
    assert d["ci_low"] == pytest.approx(-1.0) and d["ci_high"] == pytest.approx(-1.0)
    noisy = M.paired_delta(base + np.tile([-1.0, 1.0], 20), base)
    assert noisy["ci_low"] < 0 < noisy["ci_high"]


def test_curvature_bins():
    assert [M.curvature_bin(k) for k in (0.0, 0.02, 0.06, 1.0)] == ["straight", "gentle", "sharp", "sharp"]


def test_noise_is_per_sample_and_seeded():
    a = sample_noise("clip__1__default", 0, 6, W)
    assert a.shape == (6, W, 2)
    assert np.array_equal(a.numpy(), sample_noise("clip__1__default", 0, 6, W).numpy())
    assert not np.array_equal(a.numpy(), sample_noise("clip__2__default", 0, 6, W).numpy())
    assert not math.isclose(float(a.sum()), float(sample_noise("clip__1__default", 1, 6, W).sum()))


def test_eval_writes_report_and_reuses_predictions(tiny_store, tmp_path):
    run_dir = tmp_path / "ft"
    train(TrainConfig(store=tiny_store, run_dir=run_dir, steps=5, device="cpu"))
    cfg = EvalConfig(store=tiny_store, checkpoints=(str(run_dir),), device="cpu", num_samples=3, max_panels=2)
    results = run(cfg)
    out = run_dir / "eval"
    assert results["out_dir"] == str(out)
    for name in (
        "metrics.json",
        "per_sample.csv",
        "report.md",
        "plots/by_curvature_min_ade.png",
        "plots/sample_00.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["overall"]) == {"baseline", "ft"} and "min_ade" in saved["paired"]["ft"]
    assert "K=3" in saved["conventions"]["samples"]
    assert 0.0 <= saved["overall"]["ft"]["reward/gt_is_best"] <= 1.0  # reward metrics (issue 16)
    preds = sorted((out / "predictions").glob("*.npz"))
    assert len(preds) == 2
    stamps = [p.stat().st_mtime_ns for p in preds]
    again = run(cfg)
    assert [p.stat().st_mtime_ns for p in preds] == stamps  # reused, not recomputed
    assert again["overall"] == results["overall"]
    report = (out / "report.md").read_text()
    assert "## Paired: ft - baseline" in report and "best-of-K chosen by full 6.4 s" in report
    assert "## Rewards" in report and "| gt_is_best |" in report
    verdict = report.splitlines()[2]  # right under the title
    assert verdict.startswith("**ft") and "on min_ade" in verdict and "clip-level bootstrap over" in verdict
    assert "**seeded random weights**, preset tiny (seed 0)" in report and "Data: **synthetic**" in report
    assert "## Regressions" in report and "plots/loss_curves.png" in report
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(list((out / "plots").glob("*.png")))
    assert (out / "plots" / "loss_curves.png").is_file()
    assert saved["verdicts"]["ft"]["n_clips"] == saved["counts"]["clips"] == 3  # the val split's clips
