"""Scoring the policy's own samples: from normalised actions and cached samples to reward inputs.

Training (train/awr.py) and eval (reward_metrics.py) score trajectories the same way:
- trajectories come from the normalised (accel, curvature) actions through the action space's
  ``action_to_traj`` with the sample's history (v0 from the history fit), as eval's ``predict`` does;
- a candidate's controls are the same actions de-normalised (accel m/s^2, curvature 1/m) with speeds
  integrated from that v0, so comfort and reasoning read the controls that made the path;
- the logged trajectory is scored with the stored target action as its controls (traj_to_action of
  the logged poses) and the logged poses themselves as its path;
- the context is the sample's logged future and history, its cached reasoning text, and its stored
  front-camera image with the camera record precompute put in the sample's attributes.
Shapes: b samples, K candidates, w waypoints, t history steps; ego frame at t0, metres.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alpamayo_cache.config import ActionSpaceConfig
from alpamayo_cache.data.camera_model import CameraView
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.rewards.base import Candidates, RewardContext


def trajectories(
    space: UnicycleActionSpace, actions: torch.Tensor, hist_xyz: torch.Tensor, hist_rot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses of actions [b, K, w, 2] (normalised, float32, CPU): xyz [b, K, w, 3], rot [b, K, w, 3, 3]."""
    b, k, w, _ = actions.shape
    xyz, rot = space.action_to_traj(
        actions.reshape(b * k, w, 2),
        hist_xyz.repeat_interleave(k, dim=0),
        hist_rot.repeat_interleave(k, dim=0),
    )
    return xyz.reshape(b, k, w, 3), rot.reshape(b, k, w, 3, 3)


def t0_speeds(space: UnicycleActionSpace, hist_xyz: torch.Tensor, hist_rot: torch.Tensor) -> np.ndarray:
    """Speed at t0 [b] (m/s) of each sample, from its history as action_to_traj estimates it."""
    return space.estimate_t0_speed(hist_xyz.float(), hist_rot.float()).double().numpy()


def candidates(cfg: ActionSpaceConfig, actions: np.ndarray, xyz: np.ndarray, v0: float) -> Candidates:
    """K candidates from normalised actions [K, w, 2] and their poses xyz [K, w, 3]."""
    actions = np.asarray(actions, dtype=np.float64)
    accel = actions[..., 0] * cfg.accel_std + cfg.accel_mean
    curvature = actions[..., 1] * cfg.curvature_std + cfg.curvature_mean
    return Candidates.from_controls(np.asarray(xyz), accel, curvature, v0, dt=cfg.dt)


class Contexts:
    """RewardContexts of cached samples; camera records are parsed once per sample."""

    def __init__(self) -> None:
        self._cameras: dict[str, CameraView | None] = {}

    def camera(self, info: Any) -> CameraView | None:
        """The sample's front camera (None when precompute had no calibration for it)."""
        if info.sample_id not in self._cameras:
            record = getattr(info, "front_camera", None)
            self._cameras[info.sample_id] = CameraView.from_dict(record) if record else None
        return self._cameras[info.sample_id]

    def context(
        self, info: Any, gt_xyz: np.ndarray, hist_xyz: np.ndarray, image: np.ndarray | None
    ) -> RewardContext:
        """One sample's context; without its image or camera, visual safety is neutral."""
        camera = self.camera(info) if image is not None else None
        return RewardContext(
            gt_xyz=np.asarray(gt_xyz),
            hist_xyz=np.asarray(hist_xyz),
            reasoning=info.reasoning,
            image=np.asarray(image) if camera is not None else None,
            camera=camera,
        )
