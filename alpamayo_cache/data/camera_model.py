"""A serialisable front-camera record that projects ego-frame points into a stored (resized) image.

Everything geometric is delegated to the dataset dev kit (``physical_ai_av``):
- intrinsics: ``utils.camera_models.FThetaCameraModel.from_camera_row`` on the clip's
  ``camera_intrinsics`` row (width, height, cx, cy, fw_poly_0..4, bw_poly_0..4; native pixels);
- extrinsics: ``calibration.SensorExtrinsics.from_extrinsics_df`` on the clip's ``sensor_extrinsics``
  row (qx, qy, qz, qw, x, y, z); it yields the sensor-to-rig ``RigidTransform``.

Frames (dev kit, and the release's visualisation, alpamayo viz.py:40 and alpamayo2 viz_utils.py:235):
- rig = ego frame: x forward, y left, z up, metres, origin on the ground under the rear axle; the
  ego-frame trajectories of a sample are the rig frame at t0, so they need no further transform;
- camera (optical) frame: z out of the lens, x right, y down; the extrinsic quaternion rotates optical
  axes into rig axes, so ``points_cam = sensor_to_rig.inv().apply(points_rig)``;
- pixels: continuous coordinates from the top-left corner of the image, u right, v down; pixel (i, j)
  covers [i, i+1) x [j, j+1) (the dev kit's ``is_out_of_bounds`` keeps [0, width); the project's
  synthetic renderer samples pixel centres at i + 0.5).

The stored image is a resize of the native frame (``align_corners=False``: image edges map to image
edges), so a native coordinate u maps to ``u * W / W0`` (same for v). Projecting at native resolution
and then scaling is the same as scaling the f-theta intrinsics (cx, cy and the polynomial) by W / W0
when the resize keeps the aspect ratio, and stays exact when it does not (1080x1920 -> 320x576 scales
x by 0.3 but y by 0.296).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from alpamayo_cache.errors import UserError

FRONT_CAMERA = "camera_front_wide_120fov"
# Columns of the dev kit's camera_intrinsics table that FThetaCameraModel.from_camera_row reads.
INTRINSIC_KEYS: tuple[str, ...] = (
    "width",
    "height",
    "cx",
    "cy",
    *(f"fw_poly_{i}" for i in range(5)),
    *(f"bw_poly_{i}" for i in range(5)),
)


@dataclass(frozen=True)
class CameraView:
    """One camera's calibration plus the size of the image actually stored for it.

    intrinsics: the dev kit's intrinsics row (native resolution) as floats.
    rotation_xyzw: sensor-to-rig rotation quaternion (scipy order x, y, z, w).
    translation: camera origin in the rig frame, metres.
    image_hw: (height, width) of the stored image, pixels.
    """

    intrinsics: dict[str, float]
    rotation_xyzw: tuple[float, float, float, float]
    translation: tuple[float, float, float]
    image_hw: tuple[int, int]
    name: str = FRONT_CAMERA

    def __post_init__(self) -> None:
        missing = [k for k in INTRINSIC_KEYS if k not in self.intrinsics]
        if missing:
            raise UserError(f"camera {self.name}: intrinsics lack {missing}; store the full dev-kit row")
        intr = {str(k): float(v) for k, v in self.intrinsics.items()}
        quat = tuple(float(q) for q in self.rotation_xyzw)
        trans = tuple(float(t) for t in self.translation)
        hw = tuple(int(s) for s in self.image_hw)
        values = [*intr.values(), *quat, *trans]
        if len(quat) != 4 or len(trans) != 3 or len(hw) != 2 or not all(math.isfinite(v) for v in values):
            raise UserError(
                f"camera {self.name}: need a finite quaternion (4), translation (3) and image size (2)"
            )
        if abs(math.hypot(*quat) - 1.0) > 1e-3:
            raise UserError(f"camera {self.name}: rotation quaternion {quat} is not unit length")
        if min(hw) <= 0 or intr["width"] <= 0 or intr["height"] <= 0:
            raise UserError(f"camera {self.name}: image sizes must be positive (stored {hw})")
        object.__setattr__(self, "intrinsics", intr)
        object.__setattr__(self, "rotation_xyzw", quat)
        object.__setattr__(self, "translation", trans)
        object.__setattr__(self, "image_hw", hw)

    # -- construction and storage ---------------------------------------------------------------
    @classmethod
    def from_calibration(
        cls,
        intrinsics_row: Mapping[str, Any],
        extrinsics_row: Mapping[str, Any],
        image_hw: tuple[int, int],
        name: str = FRONT_CAMERA,
    ) -> CameraView:
        """From one row of the clip's camera_intrinsics and sensor_extrinsics tables (dict or Series)."""
        intr = {k: float(intrinsics_row[k]) for k in INTRINSIC_KEYS}
        quat = tuple(float(extrinsics_row[k]) for k in ("qx", "qy", "qz", "qw"))
        trans = tuple(float(extrinsics_row[k]) for k in ("x", "y", "z"))
        return cls(intr, quat, trans, image_hw, name)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (for the zarr sample attrs)."""
        return {
            "name": self.name,
            "model": "ftheta",
            "intrinsics": dict(self.intrinsics),
            "rotation_xyzw": list(self.rotation_xyzw),
            "translation": list(self.translation),
            "image_hw": list(self.image_hw),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> CameraView:
        """Inverse of to_dict; a malformed record raises UserError."""
        try:
            if record.get("model", "ftheta") != "ftheta":
                raise UserError(f"camera model {record['model']!r} is not supported (only ftheta)")
            return cls(
                dict(record["intrinsics"]),
                tuple(record["rotation_xyzw"]),
                tuple(record["translation"]),
                tuple(record["image_hw"]),
                str(record.get("name", FRONT_CAMERA)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"malformed camera record ({type(exc).__name__}: {exc}); re-run precompute"
            ) from exc

    # -- dev-kit objects ------------------------------------------------------------------------
    @cached_property
    def camera_model(self) -> Any:
        """The dev kit's FThetaCameraModel at native resolution."""
        import pandas as pd
        from physical_ai_av.calibration import CameraIntrinsics
        from physical_ai_av.utils.camera_models import FThetaCameraModel

        table = pd.DataFrame([self.intrinsics], index=[self.name])
        return CameraIntrinsics.from_intrinsics_df(table, FThetaCameraModel).camera_models[self.name]

    @cached_property
    def sensor_to_rig(self) -> Any:
        """The dev kit's sensor-to-rig scipy RigidTransform."""
        import pandas as pd
        from physical_ai_av.calibration import SensorExtrinsics

        row = dict(zip(("qx", "qy", "qz", "qw"), self.rotation_xyzw, strict=True))
        row |= dict(zip(("x", "y", "z"), self.translation, strict=True))
        table = pd.DataFrame([row], index=[self.name])
        return SensorExtrinsics.from_extrinsics_df(table).sensor_poses[self.name]

    @cached_property
    def max_ray_angle(self) -> float:
        """Largest angle (rad) off the optical axis that the native image corners see.

        Rays further out lie outside the calibrated range of the polynomial, whose extrapolation can
        fold back into the image; they are never projected.
        """
        w, h = self.intrinsics["width"], self.intrinsics["height"]
        corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
        rays = self.camera_model.pixel2ray(corners)
        return float(np.max(np.arccos(np.clip(rays[:, 2] / np.linalg.norm(rays, axis=-1), -1.0, 1.0))))

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from native to stored pixels."""
        return self.image_hw[1] / self.intrinsics["width"], self.image_hw[0] / self.intrinsics["height"]

    # -- projection -----------------------------------------------------------------------------
    def project(self, points_ego: np.ndarray, within_image: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Project ego-frame points [N, 3] (m) to stored-image coordinates uv [N, 2] and a validity mask [N].

        valid: in front of the lens, inside the calibrated angle range, finite, and (``within_image``)
        inside the image. Invalid rows of uv hold whatever came out (possibly NaN): ignore them.
        """
        points = np.asarray(points_ego, dtype=np.float64).reshape(-1, 3)
        cam = np.asarray(self.sensor_to_rig.inv().apply(points), dtype=np.float64).reshape(-1, 3)
        norm = np.linalg.norm(cam, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            angle = np.arccos(np.clip(cam[:, 2] / norm, -1.0, 1.0))
            uv = np.asarray(self.camera_model.ray2pixel(cam), dtype=np.float64).reshape(-1, 2)
        # On the optical axis the dev kit divides 0 by 0 (direction of an empty xy); the image of that
        # ray is the principal point.
        on_axis = (np.linalg.norm(cam[:, :2], axis=-1) == 0) & (cam[:, 2] > 0)
        uv[on_axis] = self.camera_model.principal_point
        valid = (cam[:, 2] > 0) & (angle <= self.max_ray_angle) & np.isfinite(uv).all(axis=-1)
        if within_image:
            valid &= ~self.camera_model.is_out_of_bounds(np.nan_to_num(uv, nan=-1.0))
        return uv * np.array(self.scale), valid
