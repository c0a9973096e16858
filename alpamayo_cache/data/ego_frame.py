"""Ego history and future in the ego frame at t0, exactly as the released Alpamayo-R1 loader makes them.

Input: the dev kit's egomotion interpolator (``physical_ai_av``; what ``alpamayo_cache.data.source``
returns): called with int64 timestamps (microseconds, the clip's clock) it returns a state whose
``.pose`` is a scipy ``RigidTransform`` in the world frame (rotation = rig-to-world).

Output, float32, metres / rotation matrices in the ego frame at t0 (x forward, y left, z up):
- history: 16 poses at t0 - 1.5 s ... t0 (the last one is t0 itself: (0, 0, 0), identity);
- future: 64 poses at t0 + 0.1 s ... t0 + 6.4 s.

Bit-exactness with the release loader needs its route, not just its maths:
- positions: ``R_t0^-1 (p(t) - p(t0))`` in float64, with ``R_t0`` rebuilt from the *quaternion* of the
  interpolated t0 pose (scipy renormalises a quaternion it is given, so the result can differ in the last
  bit from using the interpolated rotation object directly);
- rotations: ``(R_t0^-1 * R(t))`` composed as quaternions, each ``R(t)`` also rebuilt from its quaternion,
  then turned into matrices;
- only at the end float64 -> float32 (round to nearest, what ``torch.Tensor.float()`` does).
Composing the rotation objects directly (no quaternion round trip) changes a few float32 values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alpamayo_cache.data.source import BadClip

US = 1_000_000


def _times(t0_us: int, history_steps: int, future_steps: int, step_us: int) -> tuple[np.ndarray, np.ndarray]:
    """History times t0 - (h-1) step ... t0 and future times t0 + step ... t0 + f step, int64 us.

    The release builds these offsets with a float64 ``arange`` of ``time_step * 1e6`` and truncates to
    int64; for its 0.1 s step every offset is an exact integer, so integer arithmetic gives the same times.
    """
    t0 = np.int64(t0_us)
    hist = t0 + np.int64(step_us) * np.arange(-(history_steps - 1), 1, dtype=np.int64)
    fut = t0 + np.int64(step_us) * np.arange(1, future_steps + 1, dtype=np.int64)
    return hist, fut


def _sample(ego: Any, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World positions [n, 3] and rig-to-world quaternions [n, 4] (x, y, z, w), float64."""
    try:
        pose = ego(times).pose
        return np.asarray(pose.translation), np.asarray(pose.rotation.as_quat())
    except Exception as exc:  # scipy refuses non-finite rotations or times it cannot interpolate
        raise BadClip(
            f"bad egomotion: interpolator refused the keyframe's times ({type(exc).__name__})"
        ) from exc


def ego_frame_trajectory(
    ego: Any,
    t0_us: int,
    history_steps: int = 16,
    future_steps: int = 64,
    step_us: int = 100_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hist_xyz [h, 3], hist_rot [h, 3, 3], fut_xyz [f, 3], fut_rot [f, 3, 3]), float32, ego frame at t0.

    Raises ``BadClip("too short: ...")`` when the history or future reaches outside the egomotion's time
    range, and ``BadClip("bad egomotion: ...")`` when the interpolator fails or the result is not finite.
    """
    from scipy.spatial.transform import Rotation

    hist_t, fut_t = _times(t0_us, history_steps, future_steps, step_us)
    start, end = (int(v) for v in (ego.timestamps[0], ego.timestamps[-1]))
    if hist_t[0] < start:
        raise BadClip(
            f"too short: history starts at {hist_t[0] / US:.3f} s, before the egomotion's first pose at "
            f"{start / US:.3f} s (t0 {t0_us / US:.3f} s)"
        )
    if fut_t[-1] > end:
        raise BadClip(
            f"too short: future ends at {fut_t[-1] / US:.3f} s, after the egomotion's last pose at "
            f"{end / US:.3f} s (t0 {t0_us / US:.3f} s)"
        )
    hist_p, hist_q = _sample(ego, hist_t)
    fut_p, fut_q = _sample(ego, fut_t)
    if not all(np.isfinite(a).all() for a in (hist_p, hist_q, fut_p, fut_q)):
        raise BadClip("bad egomotion: NaN/inf poses around the keyframe")

    # The ego frame at t0 is the last history pose, rebuilt from its quaternion (see module docstring).
    origin = hist_p[-1].copy()
    to_ego = Rotation.from_quat(hist_q[-1].copy()).inv()  # world -> ego frame at t0
    out64 = (
        to_ego.apply(hist_p - origin),
        (to_ego * Rotation.from_quat(hist_q)).as_matrix(),
        to_ego.apply(fut_p - origin),
        (to_ego * Rotation.from_quat(fut_q)).as_matrix(),
    )
    # float64 -> float32 with round-to-nearest-even, the same cast as the release's torch ``.float()``.
    hist_xyz, hist_rot, fut_xyz, fut_rot = (np.asarray(a, dtype=np.float64).astype(np.float32) for a in out64)
    if not all(np.isfinite(a).all() for a in (hist_xyz, hist_rot, fut_xyz, fut_rot)):
        raise BadClip("bad egomotion: NaN/inf poses around the keyframe")
    return hist_xyz, hist_rot, fut_xyz, fut_rot
