"""Inputs of the reward functions and their registry.

A reward is a pure function ``fn(ctx, cand) -> np.ndarray [K]`` with values in [0, 1], higher is better,
registered under a name with ``@reward("name")``. ``ctx`` is one sample (ground truth, history, cached
reasoning text, optionally the front image and its camera); ``cand`` holds K trajectories and the unicycle
controls that produced them.

Frames and units: ego frame at t0 (x forward, y left, z up), metres, seconds, steps dt = 0.1 s apart;
the ego is at the origin at t0. Shape legend: K candidates, w waypoints, t history steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alpamayo_cache.data.camera_model import CameraView

DT = 0.1  # s between waypoints (REFERENCE §1, action space)


@dataclass(frozen=True)
class RewardContext:
    """One sample. gt_xyz [w, 3], hist_xyz [t, 3] (ending at t0), reasoning text ("" when none),
    image: RGB uint8 [H, W, 3] of the front camera at t0, camera: its CameraView (both optional)."""

    gt_xyz: np.ndarray
    hist_xyz: np.ndarray
    reasoning: str = ""
    image: np.ndarray | None = None
    camera: CameraView | None = None

    def __post_init__(self) -> None:
        gt = np.asarray(self.gt_xyz, dtype=np.float64)
        hist = np.asarray(self.hist_xyz, dtype=np.float64)
        if gt.ndim != 2 or gt.shape[1] != 3 or hist.ndim != 2 or hist.shape[1] != 3:
            raise ValueError(f"gt_xyz must be [w, 3] and hist_xyz [t, 3], got {gt.shape} and {hist.shape}")
        object.__setattr__(self, "gt_xyz", gt)
        object.__setattr__(self, "hist_xyz", hist)
        object.__setattr__(self, "reasoning", self.reasoning or "")
        if self.image is not None:
            image = np.asarray(self.image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            if self.camera is not None and tuple(image.shape[:2]) != self.camera.image_hw:
                raise ValueError(
                    f"image is {image.shape[:2]} but its camera record says {self.camera.image_hw}"
                )
            object.__setattr__(self, "image", image)

    @property
    def t0_speed(self) -> float:
        """Speed at t0 (m/s) from the last history step (finite difference)."""
        if len(self.hist_xyz) < 2:
            return 0.0
        return float(np.linalg.norm(self.hist_xyz[-1, :2] - self.hist_xyz[-2, :2]) / DT)


@dataclass(frozen=True)
class Candidates:
    """K trajectories: xyz [K, w, 3] and the physical controls that produced them: accel [K, w] (m/s^2),
    curvature [K, w] (1/m), speed [K, w+1] (m/s; speed[:, 0] at t0). Step k of the unicycle turns by
    curvature[k] * (speed[k] dt + accel[k] dt^2 / 2) (model/action_space.py, action_to_traj)."""

    xyz: np.ndarray
    accel: np.ndarray
    curvature: np.ndarray
    speed: np.ndarray
    dt: float = DT

    def __post_init__(self) -> None:
        arrays = {
            name: np.asarray(getattr(self, name), dtype=np.float64)
            for name in ("xyz", "accel", "curvature", "speed")
        }
        k, w = arrays["xyz"].shape[:2] if arrays["xyz"].ndim == 3 else (-1, -1)
        expected = {"xyz": (k, w, 3), "accel": (k, w), "curvature": (k, w), "speed": (k, w + 1)}
        if k < 1 or w < 2 or any(arrays[n].shape != s for n, s in expected.items()):
            got = {n: a.shape for n, a in arrays.items()}
            raise ValueError(
                f"candidates need xyz [K, w, 3], accel/curvature [K, w], speed [K, w+1]; got {got}"
            )
        for name, value in arrays.items():
            object.__setattr__(self, name, value)

    @property
    def k(self) -> int:
        return int(self.xyz.shape[0])

    @classmethod
    def from_controls(
        cls, xyz: np.ndarray, accel: np.ndarray, curvature: np.ndarray, v0: np.ndarray | float, dt: float = DT
    ) -> Candidates:
        """Speeds from v0 [K] (or a scalar) and accel, integrated as action_to_traj does."""
        accel = np.asarray(accel, dtype=np.float64)
        v0 = np.broadcast_to(np.asarray(v0, dtype=np.float64), accel.shape[:1])
        speed = np.concatenate([v0[:, None], v0[:, None] + np.cumsum(accel * dt, axis=1)], axis=1)
        return cls(xyz, accel, curvature, speed, dt)

    @classmethod
    def from_xyz(cls, xyz: np.ndarray, v0: float, dt: float = DT) -> Candidates:
        """Finite-difference controls for trajectories without them (the logged one): xyz [K, w, 3].

        Nodes are the origin (the ego at t0) then the w waypoints. Speed at node 0 is v0; at interior
        nodes the mean of the two neighbouring step speeds; at the last node the last step speed.
        Heading of node j+1 is the direction of step j (kept from before when the step is shorter
        than 1 mm, i.e. standing still); curvature = heading change / step length.
        """
        xyz = np.asarray(xyz, dtype=np.float64)
        nodes = np.concatenate([np.zeros_like(xyz[:, :1, :2]), xyz[..., :2]], axis=1)  # [K, w+1, 2]
        step = np.diff(nodes, axis=1)  # [K, w, 2]
        length = np.linalg.norm(step, axis=-1)
        step_speed = length / dt
        speed = np.empty((xyz.shape[0], xyz.shape[1] + 1))
        speed[:, 0] = v0
        speed[:, 1:-1] = 0.5 * (step_speed[:, :-1] + step_speed[:, 1:])
        speed[:, -1] = step_speed[:, -1]
        heading = np.zeros_like(speed)  # heading 0 at t0 by definition of the ego frame
        for j in range(step.shape[1]):
            moving = length[:, j] > 1e-3
            direction = np.arctan2(step[:, j, 1], step[:, j, 0])
            heading[:, j + 1] = np.where(moving, direction, heading[:, j])
        turn = np.angle(np.exp(1j * np.diff(heading, axis=1)))  # wrapped to (-pi, pi]
        curvature = np.where(length > 1e-3, turn / np.maximum(length, 1e-3), 0.0)
        accel = np.diff(speed, axis=1) / dt
        return cls(xyz, accel, curvature, speed, dt)

    def concat(self, other: Candidates) -> Candidates:
        """These candidates followed by ``other``'s (same w and dt)."""
        return Candidates(
            np.concatenate([self.xyz, other.xyz]),
            np.concatenate([self.accel, other.accel]),
            np.concatenate([self.curvature, other.curvature]),
            np.concatenate([self.speed, other.speed]),
            self.dt,
        )

    # -- behaviour summaries used by several rewards -----------------------------------------------
    def heading_change(self) -> np.ndarray:
        """Final heading minus heading at t0 [K] (rad, left positive), from the controls."""
        arc = self.speed[:, :-1] * self.dt + 0.5 * self.accel * self.dt**2
        return np.sum(self.curvature * arc, axis=1)

    def distance(self) -> np.ndarray:
        """Path length [K] (m) in XY from the origin through every waypoint."""
        nodes = np.concatenate([np.zeros_like(self.xyz[:, :1, :2]), self.xyz[..., :2]], axis=1)
        return np.linalg.norm(np.diff(nodes, axis=1), axis=-1).sum(axis=1)


RewardFn = Callable[[RewardContext, Candidates], np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under ``name`` (names are unique)."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return register
