"""Reading PhysicalAI-AV clips from a local folder, in either of the two layouts users have.

- **Hub cache** (what ``huggingface_hub`` and the dev kit download into):
  ``<cache>/datasets--nvidia--PhysicalAI-Autonomous-Vehicles/snapshots/<revision>/...``.
  Read through the dev kit itself (``physical_ai_av.PhysicalAIAVDatasetInterface``) in offline mode.
- **Plain folder** (what the release's download script writes with ``--output-dir``): the same files
  (``features.csv``, ``clip_index.parquet``, per-chunk zips) without the cache wrapping. The dev kit
  never looks in a plain folder offline, so we resolve files ourselves and hand the bytes to the dev
  kit's own decoders (egomotion interpolator, seekable video reader). Only file lookup differs.

Both expose the same small interface, ``ClipSource``; a third layout, the documented own-clips folder
(docs/CLIPS.md), lives in ``clip_folder.py``.

Calibration follows the dataset's conventions (physical_ai_av ``calibration.py``, ``utils/camera_models.py``):
- intrinsics: an f-theta model per camera, row columns ``width, height, cx, cy, bw_poly_0..4, fw_poly_0..4``;
  ``fw_poly`` maps the angle from the optical axis (rad) to the pixel radius, ``bw_poly`` the inverse;
  camera frame x right, y down, z out of the lens; pixels from the top-left corner, x right, y down.
- extrinsics: per sensor ``qx, qy, qz, qw, x, y, z`` = the sensor's pose in the rig frame (camera -> rig;
  quaternion scalar last); rig frame x forward, y left, z up, origin at the rear axle on the ground.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from alpamayo_cache.errors import UserError

REPO_ID = "nvidia/PhysicalAI-Autonomous-Vehicles"
CACHE_REPO_DIR = "datasets--nvidia--PhysicalAI-Autonomous-Vehicles"
EGOMOTION = "egomotion"
CAMERA_INTRINSICS = "camera_intrinsics"
SENSOR_EXTRINSICS = "sensor_extrinsics"
FTHETA_DEGREE = 4  # the dev kit reads fw_poly_0..4 and bw_poly_0..4 (camera_models.from_camera_row)
FW_POLY = tuple(f"fw_poly_{i}" for i in range(FTHETA_DEGREE + 1))
BW_POLY = tuple(f"bw_poly_{i}" for i in range(FTHETA_DEGREE + 1))
INTRINSICS_COLUMNS = ("width", "height", "cx", "cy", *BW_POLY, *FW_POLY)
EXTRINSICS_COLUMNS = ("qx", "qy", "qz", "qw", "x", "y", "z")

log = logging.getLogger(__name__)


class BadClip(Exception):
    """A clip that cannot make a sample; the message is the reason recorded in the failures list."""


class ClipSource(Protocol):
    description: str

    def clip_ids(self) -> list[str]: ...

    def egomotion(self, clip_id: str) -> Any:
        """Interpolator: timestamps [n] (us since clip start) -> state with .pose (scipy RigidTransform)."""

    def camera(self, clip_id: str, camera: str) -> Any:
        """Video reader with ``decode_images_from_timestamps(ts) -> (uint8 [n, H, W, 3], ts)``."""

    def calibration(self, clip_id: str) -> Calibration | None:
        """Camera intrinsics and extrinsics of the clip; None when the dataset has none for it."""


def _decode_egomotion(data: bytes) -> Any:
    from physical_ai_av import egomotion

    df = pd.read_parquet(io.BytesIO(data))
    return egomotion.EgomotionState.from_egomotion_df(df).create_interpolator(
        df["timestamp"].to_numpy(copy=True)
    )


def _decode_camera(video: bytes, timestamps: bytes) -> Any:
    from physical_ai_av import video as video_mod

    ts = pd.read_parquet(io.BytesIO(timestamps))["timestamp"].to_numpy(copy=True)
    return video_mod.SeekVideoReader(video_data=io.BytesIO(video), timestamps=ts)


Row = dict[str, float]


@dataclass(frozen=True)
class Calibration:
    """One clip's camera calibration as plain rows in the dataset's column names.

    ``intrinsics[camera]``: ``width, height, cx, cy, bw_poly_0..4, fw_poly_0..4`` (f-theta, pixels, rad).
    ``extrinsics[sensor]``: ``qx, qy, qz, qw, x, y, z``: the sensor's pose in the rig frame (camera -> rig).
    ``to_devkit`` / ``camera_model`` / ``sensor_pose`` give the dev kit's own objects for them (project
    rig-frame points with ``camera_model(cam).ray2pixel(sensor_pose(cam).inv().apply(points))``).
    """

    intrinsics: dict[str, Row]
    extrinsics: dict[str, Row]

    @property
    def cameras(self) -> tuple[str, ...]:
        """Cameras with both intrinsics and extrinsics."""
        return tuple(c for c in self.intrinsics if c in self.extrinsics)

    @classmethod
    def from_devkit(cls, intrinsics: Any, extrinsics: Any) -> Calibration:
        """From the dev kit's ``CameraIntrinsics`` (f-theta models) and ``SensorExtrinsics``."""
        intr = {}
        for cam, model in intrinsics.camera_models.items():
            row: Row = {"width": int(model.width), "height": int(model.height)}
            row["cx"], row["cy"] = (float(v) for v in model.principal_point)
            row |= {name: float(c) for name, c in zip(BW_POLY, model.r2th.coef, strict=True)}
            row |= {name: float(c) for name, c in zip(FW_POLY, model.th2r.coef, strict=True)}
            intr[str(cam)] = row
        extr = {}
        for sensor, pose in extrinsics.sensor_poses.items():
            # canonical: qw >= 0, so the same rotation always reads back as the same numbers
            quat = pose.rotation.as_quat(canonical=True)
            extr[str(sensor)] = dict(
                zip(EXTRINSICS_COLUMNS, (*map(float, quat), *map(float, pose.translation)), strict=True)
            )
        return cls(intr, extr)

    def to_devkit(self) -> tuple[Any, Any]:
        """(``CameraIntrinsics``, ``SensorExtrinsics``) built by the dev kit's own table readers."""
        from physical_ai_av import calibration

        intr = pd.DataFrame.from_dict(self.intrinsics, orient="index")
        extr = pd.DataFrame.from_dict(self.extrinsics, orient="index")
        return (
            calibration.CameraIntrinsics.from_intrinsics_df(intr),
            calibration.SensorExtrinsics.from_extrinsics_df(extr),
        )

    def camera_model(self, camera: str) -> Any:
        """The dev kit's ``FThetaCameraModel`` of ``camera``."""
        from physical_ai_av.utils.camera_models import FThetaCameraModel

        return FThetaCameraModel.from_camera_row(pd.Series(self._row(self.intrinsics, camera, "intrinsics")))

    def sensor_pose(self, camera: str) -> Any:
        """``scipy RigidTransform`` camera -> rig (apply it to camera-frame points to get rig-frame ones)."""
        import scipy.spatial.transform as spt

        row = self._row(self.extrinsics, camera, "extrinsics")
        return spt.RigidTransform.from_components(
            rotation=spt.Rotation.from_quat([row["qx"], row["qy"], row["qz"], row["qw"]]),
            translation=[row["x"], row["y"], row["z"]],
        )

    @staticmethod
    def _row(rows: dict[str, Row], camera: str, what: str) -> Row:
        if camera not in rows:
            raise KeyError(f"no {what} for {camera}; calibrated: {sorted(rows)}")
        return rows[camera]


def _decode_calibration(clip_id: str, read: Any, devkit_objects: bool = False) -> Calibration | None:
    """Calibration from the dev kit's decoders (dataset.py ~343); a damaged one is logged, never fatal."""
    try:
        first, second = read()
        if not devkit_objects:
            from physical_ai_av import calibration

            first = calibration.CameraIntrinsics.from_intrinsics_df(first)
            second = calibration.SensorExtrinsics.from_extrinsics_df(second)
        return Calibration.from_devkit(first, second)
    except Exception as exc:  # missing columns, uncached file offline, unreadable parquet
        log.warning(
            f"clip {clip_id}: calibration unreadable, treated as absent ({type(exc).__name__}: {exc})"
        )
        return None


class FolderSource:
    """The dataset's files in a plain folder (no hub cache), decoded with the dev kit's decoders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"folder {self.root}"
        features = pd.read_csv(self.root / "features.csv", index_col="feature")
        self.features = features
        self.clip_index = pd.read_parquet(self.root / "clip_index.parquet")

    def clip_ids(self) -> list[str]:
        return [str(c) for c in self.clip_index.index]

    def _members(self, clip_id: str, feature: str) -> dict[str, bytes]:
        if clip_id not in self.clip_index.index:
            raise BadClip(f"clip {clip_id} is not in clip_index.parquet")
        if feature not in self.features.index:
            raise BadClip(f"feature {feature} is not in features.csv")
        row = self.features.loc[feature]
        chunk = int(self.clip_index.at[clip_id, "chunk"])
        path = self.root / str(row["chunk_path"]).format(chunk_id=chunk)
        if not path.is_file():
            raise BadClip(f"missing {feature}: file {path.name} is not in the dataset folder")
        templates = json.loads(row["clip_files_in_zip"])
        out = {}
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for alias, template in templates.items():
                member = template.format(clip_id=clip_id)
                if member not in names:
                    raise BadClip(f"missing {feature}: {member} is not in {path.name}")
                out[alias] = zf.read(member)
        return out

    def egomotion(self, clip_id: str) -> Any:
        return _decode_egomotion(self._members(clip_id, EGOMOTION)["egomotion"])

    def camera(self, clip_id: str, camera: str) -> Any:
        members = self._members(clip_id, camera)
        return _decode_camera(members["video"], members["frame_timestamps"])

    def calibration(self, clip_id: str) -> Calibration | None:
        tables = [self._clip_rows(clip_id, feature) for feature in (CAMERA_INTRINSICS, SENSOR_EXTRINSICS)]
        if tables[0] is None or tables[1] is None:
            return None
        return _decode_calibration(clip_id, lambda: tables)

    def _clip_rows(self, clip_id: str, feature: str) -> pd.DataFrame | None:
        """The clip's rows of a per-chunk parquet feature (calibration); None when the dataset has none."""
        if feature not in self.features.index or clip_id not in self.clip_index.index:
            return None
        chunk = int(self.clip_index.at[clip_id, "chunk"])
        path = self.root / str(self.features.at[feature, "chunk_path"]).format(chunk_id=chunk)
        if not path.is_file():
            return None
        table = pd.read_parquet(path)
        if clip_id not in table.index.get_level_values(0):
            return None
        return table.loc[clip_id]  # as the dev kit does: rows indexed by camera / sensor name


class DevKitSource:
    """The dev kit reading a hub-cache folder offline at a fixed revision."""

    def __init__(self, cache_dir: Path, revision: str) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network from here
        import huggingface_hub.constants
        from physical_ai_av import PhysicalAIAVDatasetInterface

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        self.description = f"dev kit, hub cache {cache_dir} @ {revision[:12]}"
        self.api = PhysicalAIAVDatasetInterface(revision=revision, cache_dir=str(cache_dir))

    def clip_ids(self) -> list[str]:
        return [str(c) for c in self.api.clip_index.index]

    def _check(self, clip_id: str, feature: str) -> None:
        presence = self.api.feature_presence
        if (
            feature in presence.columns
            and clip_id in presence.index
            and not bool(presence.at[clip_id, feature])
        ):
            raise BadClip(f"missing {feature}: not present for this clip (feature_presence)")

    def egomotion(self, clip_id: str) -> Any:
        self._check(clip_id, EGOMOTION)
        return self._get(clip_id, EGOMOTION)

    def camera(self, clip_id: str, camera: str) -> Any:
        self._check(clip_id, camera)
        return self._get(clip_id, camera)

    def calibration(self, clip_id: str) -> Calibration | None:
        features = (CAMERA_INTRINSICS, SENSOR_EXTRINSICS)
        if not set(features) <= self.api.features.ALL or clip_id not in self.api.clip_index.index:
            return None
        presence = self.api.feature_presence
        chunk = int(self.api.get_clip_chunk(clip_id))
        for feature in features:
            if (
                feature in presence.columns
                and clip_id in presence.index
                and not presence.at[clip_id, feature]
            ):
                return None
            if not self.api.is_file_cached(self.api.features.get_chunk_feature_filename(chunk, feature)):
                return None  # not downloaded: the dataset, as the user has it, has no calibration here

        def read() -> list[Any]:
            return [self.api.get_clip_feature(clip_id, feature) for feature in features]

        return _decode_calibration(clip_id, read, devkit_objects=True)

    def _get(self, clip_id: str, feature: str) -> Any:
        try:
            return self.api.get_clip_feature(clip_id, feature)
        except (KeyError, FileNotFoundError) as exc:
            raise BadClip(f"missing {feature}: {exc}") from exc


def find_snapshot(path: Path) -> tuple[Path, str] | None:
    """If ``path`` is a hub cache (or inside one), return (cache_dir, revision)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if candidate.name == CACHE_REPO_DIR:
            snapshots = sorted(p.name for p in (candidate / "snapshots").glob("*") if p.is_dir())
            inside = path.relative_to(candidate).parts
            if len(inside) >= 2 and inside[0] == "snapshots":
                return candidate.parent, inside[1]
            ref = candidate / "refs" / "main"
            if ref.is_file():
                return candidate.parent, ref.read_text().strip()
            if len(snapshots) == 1:
                return candidate.parent, snapshots[0]
            raise UserError(f"{candidate} holds several snapshots and no refs/main: pass --revision")
    if (path / CACHE_REPO_DIR).is_dir():
        return find_snapshot(path / CACHE_REPO_DIR)
    return None


def open_source(path: Path, revision: str | None = None, reader: str = "auto") -> ClipSource:
    """Open a local dataset folder. ``reader``: auto | devkit | folder (PhysicalAI-AV layouts only).
    Damaged index files (features.csv, clip_index.parquet, metadata tables) are one-line errors."""
    try:
        return _open_source(Path(path), revision, reader)
    except (UserError, BadClip):
        raise
    except Exception as exc:  # pandas/pyarrow/dev-kit errors on damaged or partial downloads
        raise UserError(
            f"dataset {path} has an unreadable index file ({type(exc).__name__}: {str(exc)[:200]}): "
            "re-download the damaged file"
        ) from None


def _open_source(path: Path, revision: str | None, reader: str) -> ClipSource:
    if not path.exists():
        raise UserError(
            f"dataset folder {path} does not exist: download PhysicalAI-AV there or run `alpamayo-cache synth`"
        )
    from alpamayo_cache.data import clip_folder

    if (path / clip_folder.MANIFEST).is_file():
        if reader == "devkit":
            raise UserError(
                f"{path} is an own-clips folder (clips.json); the dev kit cannot read it: use --reader auto"
            )
        return clip_folder.ClipFolderSource(path)
    snapshot = find_snapshot(path)
    if snapshot is not None:
        cache_dir, found_revision = snapshot
        revision = revision or found_revision
        if reader == "folder":
            return FolderSource(cache_dir / CACHE_REPO_DIR / "snapshots" / revision)
        return DevKitSource(cache_dir, revision)
    if not (path / "features.csv").is_file() or not (path / "clip_index.parquet").is_file():
        clip_folder.refuse_unmarked(path)  # clip folders without a clips.json get a pointed message
        raise UserError(
            f"{path} has no features.csv/clip_index.parquet: not a PhysicalAI-AV folder or hub cache, "
            f"and no {clip_folder.MANIFEST}: not an own-clips folder (docs/CLIPS.md)"
        )
    if reader == "devkit":
        raise UserError(
            f"{path} is a plain folder; the dev kit reads only a hub cache offline (use --reader folder)"
        )
    return FolderSource(path)
