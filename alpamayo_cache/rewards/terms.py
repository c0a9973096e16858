"""Kinematic rewards: similarity to the logged trajectory, and ride comfort.

gt_similarity = exp(-d / scale), d the mean XY displacement (m) between a candidate and the logged
trajectory over all w waypoints (the ADE of REFERENCE §5); scale defaults to 1 m, so a candidate
everywhere 1 m off scores exp(-1) = 0.368 and the logged trajectory itself scores 1.

comfort = mean over time of two per-step scores, averaged 0.5 / 0.5:
- longitudinal jerk j = d accel / dt (m/s^3), between consecutive controls;
- lateral acceleration a_lat = v^2 kappa (m/s^2), with v the mean speed over the step.
Each per-step score is 1 up to a comfortable bound, falls linearly, and is 0 from a limit on:
- jerk: comfortable up to 2.0 m/s^3 (ride-comfort studies put the comfortable range at 0.9-2 m/s^3),
  limit 4.13 m/s^3 (the nuPlan planning metric's max_abs_lon_jerk comfort bound);
- lateral acceleration: comfortable up to 2.0 m/s^2 (passengers start to notice 2-4 m/s^2),
  limit 4.89 m/s^2 (nuPlan's max_abs_lat_accel comfort bound).
"""

from __future__ import annotations

import numpy as np

from alpamayo_cache.rewards.base import Candidates, RewardContext, reward

JERK_COMFORT = 2.0  # m/s^3
JERK_LIMIT = 4.13  # m/s^3
LAT_ACCEL_COMFORT = 2.0  # m/s^2
LAT_ACCEL_LIMIT = 4.89  # m/s^2


def mean_displacement(ctx: RewardContext, cand: Candidates) -> np.ndarray:
    """Mean XY distance [K] (m) to the logged trajectory over the waypoints both have."""
    w = min(cand.xyz.shape[1], ctx.gt_xyz.shape[0])
    diff = cand.xyz[:, :w, :2] - ctx.gt_xyz[None, :w, :2]
    return np.linalg.norm(diff, axis=-1).mean(axis=1)


@reward("gt_similarity")
def gt_similarity(ctx: RewardContext, cand: Candidates, scale: float = 1.0) -> np.ndarray:
    """exp(-mean XY displacement / scale) [K]; scale in metres."""
    return np.exp(-mean_displacement(ctx, cand) / scale)


def ramp_down(value: np.ndarray, comfortable: float, limit: float) -> np.ndarray:
    """1 for |value| <= comfortable, 0 for |value| >= limit, linear in between."""
    return np.clip((limit - np.abs(value)) / (limit - comfortable), 0.0, 1.0)


@reward("comfort")
def comfort(
    ctx: RewardContext,
    cand: Candidates,
    jerk_comfort: float = JERK_COMFORT,
    jerk_limit: float = JERK_LIMIT,
    lat_comfort: float = LAT_ACCEL_COMFORT,
    lat_limit: float = LAT_ACCEL_LIMIT,
) -> np.ndarray:
    """0.5 * mean jerk score + 0.5 * mean lateral-acceleration score [K] (see the module docstring)."""
    jerk = np.diff(cand.accel, axis=1) / cand.dt  # [K, w-1]
    mid_speed = 0.5 * (cand.speed[:, :-1] + cand.speed[:, 1:])  # [K, w]
    lateral = mid_speed**2 * cand.curvature  # [K, w]
    jerk_score = ramp_down(jerk, jerk_comfort, jerk_limit).mean(axis=1)
    lat_score = ramp_down(lateral, lat_comfort, lat_limit).mean(axis=1)
    return 0.5 * jerk_score + 0.5 * lat_score
