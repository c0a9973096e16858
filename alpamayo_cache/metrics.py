"""Trajectory metrics, each with its convention spelled out (REFERENCE §5).

Inputs per sample: K predicted trajectories [K, w, 3] (+ rotations) and the ground truth [w, 3], in
the ego frame at t0 (x forward, y left, metres), 0.1 s apart. Distances are in the XY plane except
``corner_distance`` (3-D box corners).

- ``min_ade``: official best-of-K. The sample with the lowest full-horizon (6.4 s) ADE is chosen;
  ``min_ade/by_t=0.5|1.0|3.0|5.0`` are *that same sample's* ADE over the first 5/10/30/50 steps.
- ``min_ade_reselect/by_t=...``: the best sample chosen again at each horizon (always <= the above).
- ``ade``: sample 0 alone (a single-shot prediction). ``min_fde``: best final-point error.
- ``centre_ade``: XY ADE of the mean of the K trajectories (the centre of the predicted set);
  ``centre_gap`` = centre_ade - min_ade: how far the set's centre sits from its best member.
- ``corner_distance``: a 4 x 3 x 2 m box (length, width, height) at each pose; per time step and
  corner the distance to the ground-truth corner, minimum over the K samples, then averaged.
- straight-line bias: lateral offset y at 3 s and 6.4 s and the heading change at 6.4 s, of the
  mean over K samples vs the ground truth; a ground-truth turn (|heading change| > 15 deg) counts as
  "predicted straight" when the predicted mean heading change stays within 15 deg.
"""

from __future__ import annotations

import math

import numpy as np

HORIZONS_S = (0.5, 1.0, 3.0, 5.0)
STEP_S = 0.1
BOX_DIMS = (4.0, 3.0, 2.0)
TURN_DEG = 15.0
# Curvature bins (1/m) of the ground-truth path's largest |curvature|.
CURVATURE_BINS = (("straight", 0.0, 0.01), ("gentle", 0.01, 0.05), ("sharp", 0.05, math.inf))
# The metrics compared model against model in the paired tables (metres, except the heading in degrees).
KEY_METRICS = (
    "min_ade",
    "min_ade/by_t=3.0",
    "ade",
    "min_fde",
    "centre_ade",
    "centre_gap",
    "corner_distance",
    "lateral_error_6.4s",
    "heading_error_deg",
)


def yaw_of(rot: np.ndarray) -> np.ndarray:
    return np.arctan2(rot[..., 1, 0], rot[..., 0, 0])


def box_corners(xyz: np.ndarray, rot: np.ndarray, dims: tuple[float, float, float] = BOX_DIMS) -> np.ndarray:
    """Corners [..., 8, 3] of boxes centred at xyz [..., 3] with orientation rot [..., 3, 3]."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    local = signs * (np.asarray(dims) / 2.0)  # [8, 3]
    return xyz[..., None, :] + np.einsum("...ij,kj->...ki", rot, local)


def sample_metrics(
    pred_xyz: np.ndarray, pred_rot: np.ndarray, gt_xyz: np.ndarray, gt_rot: np.ndarray
) -> dict[str, float]:
    """All metrics of one sample. pred_xyz [K, w, 3], pred_rot [K, w, 3, 3], gt_xyz [w, 3], gt_rot [w, 3, 3]."""
    err = np.linalg.norm(pred_xyz[..., :2] - gt_xyz[None, :, :2], axis=-1)  # [K, w]
    full = err.mean(axis=1)
    best = int(full.argmin())
    out: dict[str, float] = {"min_ade": float(full[best]), "ade": float(full[0]), "best_sample": float(best)}
    for h in HORIZONS_S:
        n = int(round(h / STEP_S))
        out[f"min_ade/by_t={h}"] = float(err[best, :n].mean())
        out[f"min_ade_reselect/by_t={h}"] = float(err[:, :n].mean(axis=1).min())
    out["min_fde"] = float(err[:, -1].min())
    centre = np.linalg.norm(pred_xyz[..., :2].mean(axis=0) - gt_xyz[:, :2], axis=-1)  # [w]
    out["centre_ade"] = float(centre.mean())
    out["centre_gap"] = out["centre_ade"] - out["min_ade"]
    corners = np.linalg.norm(
        box_corners(pred_xyz, pred_rot) - box_corners(gt_xyz, gt_rot)[None], axis=-1
    )  # [K, w, 8]
    out["corner_distance"] = float(corners.min(axis=0).mean())
    mean_pred = pred_xyz.mean(axis=0)
    i3 = int(round(3.0 / STEP_S)) - 1
    for name, idx in (("3s", i3), ("6.4s", -1)):
        out[f"pred_lateral_{name}"] = float(mean_pred[idx, 1])
        out[f"gt_lateral_{name}"] = float(gt_xyz[idx, 1])
        out[f"lateral_error_{name}"] = abs(out[f"pred_lateral_{name}"] - out[f"gt_lateral_{name}"])
    pred_heading = float(np.degrees(np.angle(np.exp(1j * yaw_of(pred_rot[:, -1])).mean())))
    gt_heading = float(np.degrees(yaw_of(gt_rot[-1])))
    out["pred_heading_deg"] = pred_heading
    out["gt_heading_deg"] = gt_heading
    out["heading_error_deg"] = abs(pred_heading - gt_heading)
    out["gt_turn"] = float(abs(gt_heading) > TURN_DEG)
    out["turn_predicted_straight"] = float(abs(gt_heading) > TURN_DEG and abs(pred_heading) <= TURN_DEG)
    return out


def curvature_bin(max_abs_curvature: float) -> str:
    for name, lo, hi in CURVATURE_BINS:
        if lo <= max_abs_curvature < hi:
            return name
    return CURVATURE_BINS[-1][0]


def aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means over samples; the turn share is over ground-truth turns only."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in ("best_sample", "gt_turn", "turn_predicted_straight")]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    turns = [r for r in rows if r["gt_turn"]]
    out["n"] = float(len(rows))
    out["gt_turns"] = float(len(turns))
    out["turns_predicted_straight_share"] = (
        float(np.mean([r["turn_predicted_straight"] for r in turns])) if turns else float("nan")
    )
    return out


def paired_delta(
    candidate: np.ndarray, baseline: np.ndarray, seed: int = 0, n_boot: int = 2000
) -> dict[str, float]:
    """Per-sample differences candidate - baseline: mean, bootstrap 95% interval, win rate (lower wins)."""
    delta = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = len(delta)
    if n == 0:
        return {
            "mean": float("nan"),
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "win_rate": float("nan"),
            "n": 0,
        }
    rng = np.random.default_rng(seed)
    boots = delta[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    return {
        "mean": float(delta.mean()),
        "ci_low": float(np.percentile(boots, 2.5)),
        "ci_high": float(np.percentile(boots, 97.5)),
        "win_rate": float((delta < 0).mean()),
        "n": n,
    }


def summarise(
    cfg,
    models: dict[str, str],
    per_sample: dict[str, list[dict[str, float]]],
    bins: list[str],
    camera_sets: list[str],
) -> dict:
    """Aggregates per model, per curvature bin and camera set, and paired deltas against the baseline."""
    results: dict = {
        "models": models,
        "conventions": conventions(cfg),
        "overall": {},
        "by_curvature": {},
        "by_camera_set": {},
        "paired": {},
    }
    for name, rows in per_sample.items():
        results["overall"][name] = aggregate(rows)
        results["by_curvature"][name] = {
            b: aggregate([r for r, rb in zip(rows, bins, strict=True) if rb == b]) for b in sorted(set(bins))
        }
        if len(set(camera_sets)) > 1:
            results["by_camera_set"][name] = {
                c: aggregate([r for r, rc in zip(rows, camera_sets, strict=True) if rc == c])
                for c in sorted(set(camera_sets))
            }
    base = per_sample["baseline"]
    for name, rows in per_sample.items():
        if name == "baseline":
            continue
        paired = {}
        for metric in KEY_METRICS:
            paired[metric] = paired_delta(
                [r[metric] for r in rows], [r[metric] for r in base], cfg.seed, cfg.bootstrap
            )
            for b in sorted(set(bins)):
                sel = [i for i, rb in enumerate(bins) if rb == b]
                paired[f"{metric}@{b}"] = paired_delta(
                    [rows[i][metric] for i in sel], [base[i][metric] for i in sel], cfg.seed, cfg.bootstrap
                )
        results["paired"][name] = paired
    return results


def conventions(cfg) -> dict[str, str]:
    return {
        "samples": f"K={cfg.num_samples} trajectories per sample, Euler {cfg.num_steps} steps, same initial noise for every model (seed {cfg.seed})",
        "min_ade": "best-of-K chosen by full 6.4 s XY ADE; by_t values are that sample's ADE over the first 0.5/1/3/5 s",
        "min_ade_reselect": "best-of-K re-chosen at each horizon",
        "ade": "sample 0 only",
        "corner_distance": "4x3x2 m box, min over K per time step and corner, then mean",
        "straight_line_bias": "lateral offset / heading change of the mean of K vs ground truth; turn = |GT heading change| > 15 deg",
        "curvature_bins": "max |GT curvature|: straight < 0.01, gentle < 0.05, sharp >= 0.05 1/m",
        "paired": "per-sample candidate - baseline; mean, bootstrap 95% CI, win rate = share of samples where the candidate is lower",
    }
