"""History tokens exactly as the released Alpamayo-R1 computes them (delta tokenizer, no yaw).

The prompt carries the ego history as 48 tokens: for each of the 16 history poses (ego frame at t0,
x forward, y left, z up, metres) the displacement from the previous pose, one bin per axis. The first
displacement is taken from the origin, i.e. it is the oldest pose itself (the release pads the track
with a zero row before differencing), so a car driving forward faster than ~2.7 m/s clamps it to bin 0.

Bit-exactness is the point of this module. The release runs the arithmetic in the dtype of the history
tensor, which its loader makes float32; the bounds are float32 too. Doing the same steps in float64
moves ~9% of the tokens by one bin (stationary ego with float64 last-bit noise, straight driving at many
headings), because many values sit on or next to a .5 tie. So every step below is float32, in the
release's order:

    d = p[i] - p[i-1]                     (p[-1] = 0)
    u = (d - min) / (max - min)           (max - min computed in float32 too: 8, 8, 20)
    bin = clamp(round_half_even(u * (num_bins - 1)), 0, num_bins - 1)

A stationary step gives u * 999 = 499.5 exactly, which rounds to 500 (half to even), not 499.
"""

from __future__ import annotations

import numpy as np
import torch

# Delta range of the history tokenizer, metres per 0.1 s step, per axis (x forward, y left, z up):
# the release's DeltaTrajectoryTokenizer defaults. Stored as float32 on purpose (see module docstring).
DELTA_MIN = np.array([-4.0, -4.0, -10.0], dtype=np.float32)
DELTA_MAX = np.array([4.0, 4.0, 10.0], dtype=np.float32)
DEFAULT_NUM_BINS = 1000


def history_token_bins(hist_xyz: np.ndarray | torch.Tensor, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """Bins of the ego history [steps, 3] -> int64 [3 * steps], order x0 y0 z0 x1 y1 z1 ...

    ``hist_xyz`` is what the release's loader returns for one sample: float32 metres in the ego frame
    at t0, oldest first. Other float dtypes are first rounded to float32 (what the loader's ``.float()``
    does to its float64 result); the arithmetic is always float32. Token ids are these bins plus the
    history tokens' first id, added by the caller.
    """
    if isinstance(hist_xyz, torch.Tensor):
        hist_xyz = hist_xyz.detach().cpu().numpy()
    xyz = np.asarray(hist_xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"history must be [steps, 3] xyz, got shape {xyz.shape}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}")
    xyz = xyz.astype(np.float32, copy=False)
    if not np.isfinite(xyz).all():
        # The release would cast NaN to an arbitrary integer; refuse instead of emitting a token.
        raise ValueError("history holds NaN/inf: the sample's egomotion is bad")
    padded = np.concatenate([np.zeros((1, 3), dtype=np.float32), xyz], axis=0)
    delta = padded[1:] - padded[:-1]
    scaled = (delta - DELTA_MIN) / (DELTA_MAX - DELTA_MIN)
    scaled = scaled * np.float32(num_bins - 1)  # a float32 scalar keeps the product in float32
    assert scaled.dtype == np.float32  # numpy must not have promoted anything to float64
    bins = np.rint(scaled).astype(np.int64)  # rint rounds half to even, like torch.round
    return np.clip(bins, 0, num_bins - 1).reshape(-1)


def history_subset(bins: np.ndarray, count: int) -> np.ndarray:
    """The history tokens a prompt carries: all 48, or the last 45 (2 Super with
    ``pad_origin_at_beginning`` False encodes only the 15 deltas between consecutive history poses,
    i.e. it drops the origin -> oldest-pose delta, the first three tokens)."""
    if not 0 < count <= len(bins):
        raise ValueError(f"cannot keep {count} of {len(bins)} history tokens")
    return bins[len(bins) - count :]
