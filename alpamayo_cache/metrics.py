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

Comparisons are paired (same samples, same noise): candidate - baseline per sample, averaged, with
95% intervals from a clip-level (cluster) bootstrap, because the samples of one clip (several keyframes,
camera sets) are correlated and a per-sample bootstrap would make the intervals too narrow.
Every metric here is lower-is-better; units: m (distances), deg (angles), share (rates).
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
HEADLINE = "min_ade"  # the metric each compared model gets its verdict on
TURN_SHARE = "turns_predicted_straight_share"  # paired over ground-truth turns only
MIN_CLIPS = 2  # a bootstrap interval needs at least two clips to resample
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"
COUNTS = ("n", "gt_turns")


def unit_of(metric: str) -> str:
    """Unit of a metric (or of ``metric@bin``): m for distances, deg for angles, share for rates."""
    base = metric.partition("@")[0]
    if base in COUNTS:
        return "count"
    if base.endswith("_deg"):
        return "deg"
    if base.endswith("_share") or base.startswith("win_rate"):
        return "share"
    return "m"


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


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    """Cluster number [n] of each sample (0..c-1, clusters in sorted order) and c; one per sample if None."""
    if clusters is None:
        return np.arange(n), n
    labels = np.asarray(list(clusters))
    if len(labels) != n:
        raise ValueError(f"{len(labels)} cluster labels for {n} samples")
    _, index = np.unique(labels, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1 if n else 0


def cluster_bootstrap(values: np.ndarray, clusters, seed: int, n_boot: int) -> np.ndarray:
    """Bootstrap means [..., n_boot] of ``values`` [..., n], resampling whole clusters (clips) with
    replacement: each resample draws c of the c clips and averages all samples of the drawn clips (a clip
    drawn twice counts twice). Every row of ``values`` sees the same resamples. ``clusters=None``: each
    sample is its own cluster (the plain per-sample bootstrap)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    index, c = _cluster_index(clusters, n)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), index] = 1.0
    sums, counts = values @ onehot, onehot.sum(axis=0)  # [..., c], [c]
    draw = np.random.default_rng(seed).integers(0, c, size=(n_boot, c))
    # How often each clip was drawn in each resample, [n_boot, c], without a Python loop.
    flat = (draw + c * np.arange(n_boot)[:, None]).ravel()
    freq = np.bincount(flat, minlength=n_boot * c).reshape(n_boot, c).astype(np.float64)
    return (sums @ freq.T) / (freq @ counts)


def _empty_paired() -> dict[str, float | None]:
    keys = ("mean", "ci_low", "ci_high", "win_rate", "win_rate_ci_low", "win_rate_ci_high")
    return {**dict.fromkeys(keys), "n": 0, "n_clips": 0}


def paired_deltas(
    candidate: np.ndarray, baseline: np.ndarray, clusters=None, seed: int = 0, n_boot: int = 2000
) -> list[dict[str, float]]:
    """Paired statistics of several metrics at once: ``candidate``/``baseline`` [m, n] (m metrics, n
    samples). Per metric: the mean of candidate - baseline, its clip-level bootstrap 95% interval, the win
    rate (share of samples where the candidate is strictly lower) and its interval from the same resamples.
    An interval needs at least MIN_CLIPS clips; with fewer its ends are None (never 'significant'), which
    JSON writes as null and which compares equal run to run (NaN would not)."""
    delta = np.atleast_2d(np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64))
    m, n = delta.shape
    n_clips = _cluster_index(clusters, n)[1]
    if n == 0:
        return [_empty_paired() for _ in range(m)]
    wins = (delta < 0).astype(np.float64)
    out = []
    low = high = [None] * (2 * m)
    if n_clips >= MIN_CLIPS:
        boots = cluster_bootstrap(np.concatenate([delta, wins]), clusters, seed, n_boot)
        low, high = (np.percentile(boots, [2.5, 97.5], axis=-1).astype(float)).tolist()
    for i in range(m):
        out.append(
            {
                "mean": float(delta[i].mean()),
                "ci_low": low[i],
                "ci_high": high[i],
                "win_rate": float(wins[i].mean()),
                "win_rate_ci_low": low[m + i],
                "win_rate_ci_high": high[m + i],
                "n": n,
                "n_clips": n_clips,
            }
        )
    return out


def paired_delta(
    candidate: np.ndarray, baseline: np.ndarray, seed: int = 0, n_boot: int = 2000, clusters=None
) -> dict[str, float]:
    """One metric's paired statistics (see ``paired_deltas``); lower values win."""
    return paired_deltas([candidate], [baseline], clusters, seed, n_boot)[0]


def verdict(d: dict[str, float]) -> str:
    """better / worse / no significant difference, for a lower-is-better metric's paired delta."""
    if d["ci_high"] is not None and d["ci_high"] < 0:
        return BETTER
    if d["ci_low"] is not None and d["ci_low"] > 0:
        return WORSE
    return NO_DIFFERENCE  # the interval holds zero, or there were too few clips for one (None)


def regressions(paired: dict[str, dict[str, float]]) -> list[dict]:
    """Every paired metric or bin whose 95% interval lies entirely on the worse side (above zero)."""
    found = []
    for key, d in paired.items():
        if verdict(d) == WORSE:
            metric, _, group = key.partition("@")
            found.append({"key": key, "metric": metric, "bin": group or "all", "unit": unit_of(metric), **d})
    return found


def _paired_rows(
    cand: list[dict[str, float]], base: list[dict[str, float]], sel: np.ndarray, clips, cfg
) -> dict[str, dict[str, float]]:
    """KEY_METRICS on the samples ``sel``, and the predicted-straight share on its ground-truth turns."""
    group = None if clips is None else [clips[i] for i in sel]
    a = np.array([[cand[i][k] for i in sel] for k in KEY_METRICS]).reshape(len(KEY_METRICS), len(sel))
    b = np.array([[base[i][k] for i in sel] for k in KEY_METRICS]).reshape(len(KEY_METRICS), len(sel))
    stats = paired_deltas(a, b, group, cfg.seed, cfg.bootstrap)
    out = {k: {**d, "unit": unit_of(k)} for k, d in zip(KEY_METRICS, stats, strict=True)}
    turns = np.array([i for i in sel if base[i]["gt_turn"]], dtype=int)
    if len(turns):
        share = paired_delta(
            [cand[i]["turn_predicted_straight"] for i in turns],
            [base[i]["turn_predicted_straight"] for i in turns],
            cfg.seed,
            cfg.bootstrap,
            None if clips is None else [clips[i] for i in turns],
        )
        out[TURN_SHARE] = {**share, "unit": unit_of(TURN_SHARE)}
    return out


def _counts(clips: list[str], groups: list[str]) -> dict[str, dict[str, int]]:
    return {
        g: {
            "samples": sum(1 for x in groups if x == g),
            "clips": len({c for c, x in zip(clips, groups, strict=True) if x == g}),
        }
        for g in sorted(set(groups))
    }


def summarise(
    cfg,
    models: dict[str, str],
    per_sample: dict[str, list[dict[str, float]]],
    bins: list[str],
    camera_sets: list[str],
    clips: list[str] | None = None,
) -> dict:
    """Aggregates per model, per curvature bin and camera set; paired deltas against the baseline with
    clip-level intervals; a verdict on the headline metric and the regressions of every model.
    ``clips``: the clip id of each sample (None: every sample its own clip)."""
    n = len(bins)
    clip_ids = list(clips) if clips is not None else [str(i) for i in range(n)]
    results: dict = {
        "models": models,
        "conventions": conventions(cfg),
        "headline": HEADLINE,
        "counts": {
            "samples": n,
            "clips": len(set(clip_ids)),
            "by_curvature": _counts(clip_ids, bins),
            "by_camera_set": _counts(clip_ids, camera_sets),
        },
        "overall": {},
        "overall_ci": {},
        "by_curvature": {},
        "by_camera_set": {},
        "paired": {},
        "verdicts": {},
        "regressions": {},
    }
    for name, rows in per_sample.items():
        _describe_model(results, cfg, name, rows, bins, camera_sets, clip_ids)
    base = per_sample["baseline"]
    for name, rows in per_sample.items():
        if name == "baseline":
            continue
        overall = _paired_rows(rows, base, np.arange(n), clip_ids, cfg)
        by_bin = {
            b: _paired_rows(rows, base, np.flatnonzero(np.asarray(bins) == b), clip_ids, cfg)
            for b in sorted(set(bins), key=bin_order)
        }
        paired = {}
        for metric, d in overall.items():  # each metric, then the same metric per bin
            paired[metric] = d
            paired.update({f"{metric}@{b}": t[metric] for b, t in by_bin.items() if metric in t})
        results["paired"][name] = paired
        results["verdicts"][name] = {
            "metric": HEADLINE,
            "verdict": verdict(paired[HEADLINE]),
            **paired[HEADLINE],
        }
        results["regressions"][name] = regressions(paired)
    return results


def _describe_model(
    results: dict,
    cfg,
    name: str,
    rows: list[dict],
    bins: list[str],
    camera_sets: list[str],
    clip_ids: list[str],
) -> None:
    """One model's means (with clip-level intervals when there are enough clips), per bin, per camera set."""
    n = len(bins)
    results["overall"][name] = aggregate(rows)
    values = np.array([[r[k] for r in rows] for k in KEY_METRICS]).reshape(len(KEY_METRICS), n)
    if n and len(set(clip_ids)) >= MIN_CLIPS:
        low, high = np.percentile(
            cluster_bootstrap(values, clip_ids, cfg.seed, cfg.bootstrap), [2.5, 97.5], -1
        )
        results["overall_ci"][name] = {
            k: {"ci_low": float(lo), "ci_high": float(hi)}
            for k, lo, hi in zip(KEY_METRICS, low, high, strict=True)
        }
    results["by_curvature"][name] = {
        b: aggregate([r for r, rb in zip(rows, bins, strict=True) if rb == b]) for b in sorted(set(bins))
    }
    if len(set(camera_sets)) > 1:
        results["by_camera_set"][name] = {
            c: aggregate([r for r, rc in zip(rows, camera_sets, strict=True) if rc == c])
            for c in sorted(set(camera_sets))
        }


def bin_order(name: str) -> int:
    names = [b[0] for b in CURVATURE_BINS]
    return names.index(name) if name in names else len(names)


def conventions(cfg) -> dict[str, str]:
    return {
        "samples": f"K={cfg.num_samples} trajectories per sample, Euler {cfg.num_steps} steps, same initial noise for every model (seed {cfg.seed})",
        "min_ade": "best-of-K chosen by full 6.4 s XY ADE; by_t values are that sample's ADE over the first 0.5/1/3/5 s",
        "min_ade_reselect": "best-of-K re-chosen at each horizon",
        "ade": "sample 0 only",
        "corner_distance": "4x3x2 m box, min over K per time step and corner, then mean",
        "straight_line_bias": "lateral offset / heading change of the mean of K vs ground truth; turn = |GT heading change| > 15 deg",
        TURN_SHARE: "share of ground-truth turns whose predicted mean heading change stays within 15 deg",
        "curvature_bins": "max |GT curvature|: straight < 0.01, gentle < 0.05, sharp >= 0.05 1/m",
        "paired": "per-sample candidate - baseline, averaged over samples; negative = the candidate is better (every metric is lower-is-better)",
        "intervals": (
            f"95% percentile intervals from a clip-level (cluster) bootstrap: whole clips are resampled with "
            f"replacement ({cfg.bootstrap} resamples, seed {cfg.seed}), because samples of one clip are "
            f"correlated; a group with fewer than {MIN_CLIPS} clips gets no interval, and with few clips (< 5) "
            "an interval cannot be wider than the spread of the clip means: read such rows with care"
        ),
        "win_rate": "share of samples where the candidate is strictly lower; its interval comes from the same clip resamples",
        "significance": "better / worse = the 95% interval of the paired delta lies entirely below / above zero",
        "units": "distances in m, angles in deg, rates as a share (0..1)",
    }
