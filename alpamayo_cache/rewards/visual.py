"""Visual safety: how smooth and uniform the ground looks where a trajectory would drive.

Geometry. The path is the origin (ego at t0) followed by the waypoints, on the ground: the rig origin
sits on the ground under the rear axle (data/camera_model.py), so each waypoint's own z is the road
height there and no ego height is subtracted. A corridor of the vehicle's width (default 1.9 m, a
passenger car; +-0.95 m from the path, perpendicular to its heading) is projected into the stored front
image with the dev kit's camera model, one quadrilateral per step, and filled with OpenCV. Steps with a
corner behind the lens or outside the calibrated field of view are dropped; the part of a step outside
the image is clipped.

Score (all image work in OpenCV, on the stored RGB uint8 image):
- texture: t = exp(-var(Laplacian of grey) / 500); the Laplacian is cv2.Laplacian(ksize=1) in grey
  levels, so its variance is in grey levels^2: ~0 on flat asphalt, thousands on gravel or rocks;
- colour: c = exp(-s / 15) with s the RMS colour distance to the corridor's mean colour in OpenCV's
  8-bit Lab (cv2.COLOR_RGB2LAB; s = sqrt(var L + var a + var b), a CIE76 delta-E in those units): one
  road surface stays within a few units, a patch of mud, water or grass on part of it spreads it by tens
  (a corridor entirely on one odd surface is uniform, so it scores as uniform: a limit of the method);
- visual_safety = 0.5 t + 0.5 c.
Neutral 0.5 when the sample has no image or no camera record, or when fewer than 30 pixels of the
corridor land in the image (a standing start, or a path that leaves the view).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alpamayo_cache.data.camera_model import CameraView
from alpamayo_cache.rewards.base import Candidates, RewardContext, reward

VEHICLE_WIDTH_M = 1.9
ROUGHNESS_SCALE = 500.0  # grey levels^2
COLOUR_SCALE = 15.0  # 8-bit Lab units
MIN_PIXELS = 30
NEUTRAL = 0.5
_SHIFT = 4  # fillPoly sub-pixel bits: vertices are given in 1/16 pixel


def corridor_edges(path_xyz: np.ndarray, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edges [n+1, 3] of a corridor around the origin + path_xyz [n, 3] (ego frame, m).

    The normal at each node is perpendicular to the direction of the step leaving it (the last node
    reuses the last step); a step shorter than 1 mm keeps the previous direction (0 = straight ahead).
    """
    nodes = np.concatenate([np.zeros((1, 3)), np.asarray(path_xyz, dtype=np.float64)], axis=0)
    step = np.diff(nodes[:, :2], axis=0)
    heading = np.zeros(len(nodes))
    for j, (dx, dy) in enumerate(step):
        heading[j] = np.arctan2(dy, dx) if np.hypot(dx, dy) > 1e-3 else (heading[j - 1] if j else 0.0)
    heading[-1] = heading[-2]
    normal = np.stack([-np.sin(heading), np.cos(heading), np.zeros_like(heading)], axis=-1)  # left
    return nodes + half_width * normal, nodes - half_width * normal


def corridor_mask(
    camera: CameraView, path_xyz: np.ndarray, half_width: float = VEHICLE_WIDTH_M / 2
) -> np.ndarray:
    """Boolean [H, W] mask of the stored image covered by the corridor around path_xyz [n, 3]."""
    import cv2

    left, right = corridor_edges(path_xyz, half_width)
    n = len(left)
    uv, ok = camera.project(np.concatenate([left, right]), within_image=False)
    uv_l, uv_r, ok_l, ok_r = uv[:n], uv[n:], ok[:n], ok[n:]
    quads = [
        np.stack([uv_l[j], uv_l[j + 1], uv_r[j + 1], uv_r[j]])
        for j in range(n - 1)
        if ok_l[j] and ok_l[j + 1] and ok_r[j] and ok_r[j + 1]
    ]
    mask = np.zeros(camera.image_hw, dtype=np.uint8)
    for quad in quads:  # one call per quad: their union, whatever the winding
        # OpenCV vertices are pixel indices (pixel i centred on i); projected coordinates centre it on i + 0.5.
        vertices = np.round((quad - 0.5) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [vertices], 255, cv2.LINE_8, _SHIFT)
    return mask > 0


def image_features(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel Laplacian of grey [H, W] and 8-bit Lab [H, W, 3] of an RGB uint8 image, as float64."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    laplacian = cv2.Laplacian(grey, cv2.CV_64F, ksize=1)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float64)
    return laplacian, lab


def region_safety(
    features: tuple[np.ndarray, np.ndarray],
    mask: np.ndarray,
    roughness_scale: float = ROUGHNESS_SCALE,
    colour_scale: float = COLOUR_SCALE,
    min_pixels: int = MIN_PIXELS,
) -> float:
    """0.5 texture + 0.5 colour score of the masked region (NEUTRAL when it is too small)."""
    if int(mask.sum()) < min_pixels:
        return NEUTRAL
    laplacian, lab = features
    roughness = float(laplacian[mask].var())
    spread = float(np.sqrt(lab[mask].var(axis=0).sum()))
    return 0.5 * float(np.exp(-roughness / roughness_scale)) + 0.5 * float(np.exp(-spread / colour_scale))


@reward("visual_safety")
def visual_safety(ctx: RewardContext, cand: Candidates, **kwargs: Any) -> np.ndarray:
    """Visual safety [K] of each candidate's corridor in ctx.image (module docstring); kwargs go to
    region_safety, plus ``half_width`` (m) for the corridor."""
    if ctx.image is None or ctx.camera is None:
        return np.full(cand.k, NEUTRAL)
    half_width = float(kwargs.pop("half_width", VEHICLE_WIDTH_M / 2))
    features = image_features(ctx.image)
    return np.array(
        [region_safety(features, corridor_mask(ctx.camera, xyz, half_width), **kwargs) for xyz in cand.xyz]
    )
