"""Own clips: a minimal folder format for driving data that is not PhysicalAI-AV (other fleets, simulators).

docs/CLIPS.md is the reference; in short::

    <root>/clips.json                      {"format": "alpamayo-cache-clips", "version": 1, "clips": [...]}
    <root>/<clip>/egomotion.parquet|csv     timestamp_us, x, y, z, qx, qy, qz, qw  (rig -> world)
    <root>/<clip>/calibration.json          optional: per camera f-theta (or pinhole) intrinsics + extrinsics
    <root>/<clip>/<camera>.mp4              + <camera>.timestamps.parquet|csv (timestamp_us per frame), or
    <root>/<clip>/<camera>/<timestamp_us>.jpg|png

``ClipFolderSource`` reads it through the dev kit's own decoders (egomotion interpolator, seekable video
reader, camera model); a frame folder is read with the video reader's timestamp rule (the frame at or
before each requested time; requests outside the first..last frame are refused). Broken clips raise
``BadClip`` with the reasons PhysicalAI-AV clips get; a malformed root raises ``UserError``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from physical_ai_av.video import VideoReader

from alpamayo_cache.data.source import (
    BW_POLY,
    EGOMOTION,
    EXTRINSICS_COLUMNS,
    FTHETA_DEGREE,
    FW_POLY,
    BadClip,
    Calibration,
    Row,
)
from alpamayo_cache.errors import UserError

FORMAT = "alpamayo-cache-clips"
VERSION = 1
MANIFEST = "clips.json"
CALIBRATION_FILE = "calibration.json"
# Clip ids become folder names (here and in the store): no leading dot, no "..", at most 128 characters.
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
EGO_REQUIRED = ("timestamp_us", "x", "y", "z", "qx", "qy", "qz", "qw")
EGO_DERIVED = ("vx", "vy", "vz", "ax", "ay", "az", "curvature")  # optional; derived from the poses if absent
TABLE_SUFFIXES = (".parquet", ".csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST_EXAMPLE = f'{{"format": "{FORMAT}", "version": {VERSION}}}'
PINHOLE_WARN_PX = 1.0  # fitted polynomials off by more than this (native px) are reported

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the root and its manifest
def check_clip_id(clip_id: Any, where: Path) -> str:
    if not isinstance(clip_id, str) or not SAFE_ID.fullmatch(clip_id) or ".." in clip_id:
        raise UserError(
            f"clip id {clip_id!r} in {where} is not a safe name: use 1-128 characters of A-Z a-z 0-9 . _ - "
            "(no leading '.', no '..') and rename the clip folder to match"
        )
    return clip_id


def find_table(folder: Path, stem: str) -> Path | None:
    """``<stem>.parquet`` or else ``<stem>.csv``."""
    for suffix in TABLE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _discover(root: Path) -> list[str]:
    found = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted(name for name in found if find_table(root / name, EGOMOTION) is not None)


def read_manifest(root: Path) -> list[str]:
    """Clip ids from ``clips.json`` (its ``clips`` list, or the clip folders found when it has none)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}: write {MANIFEST_EXAMPLE} there (docs/CLIPS.md)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): fix it, e.g. {MANIFEST_EXAMPLE}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(
            f'{path}: "format" is {got!r}, expected "{FORMAT}": not an own-clips manifest (docs/CLIPS.md)'
        )
    if data.get("version") != VERSION:
        raise UserError(
            f"{path}: version {data.get('version')!r} is unknown to this reader (it reads version {VERSION}): "
            "upgrade alpamayo-cache or rewrite the folder in version 1"
        )
    clips = data.get("clips")
    if clips is None:
        clips = _discover(Path(root))
        if not clips:
            raise UserError(f"{path} lists no clips and {root} has no <clip>/egomotion.parquet|csv folders")
    if not isinstance(clips, list) or not clips:
        raise UserError(
            f'{path}: "clips" must be a non-empty list of clip ids (or leave it out to discover folders)'
        )
    ids = [check_clip_id(c, path) for c in clips]
    if len(set(ids)) != len(ids):
        dup = next(c for c in ids if ids.count(c) > 1)
        raise UserError(f"{path} lists clip {dup!r} twice: list each clip once")
    return ids


def refuse_unmarked(path: Path) -> None:
    """A folder of clip folders without ``clips.json`` gets a pointed message instead of a generic one."""
    if Path(path).is_dir() and _discover(Path(path)):
        raise UserError(
            f"{path} looks like an own-clips folder but has no {MANIFEST}: write {MANIFEST_EXAMPLE} there"
        )


def write_manifest(root: Path, clip_ids: Sequence[str]) -> Path:
    ids = [check_clip_id(c, Path(root) / MANIFEST) for c in clip_ids]
    path = Path(root) / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "clips": ids}, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- calibration.json
def _fit_through_origin(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least-squares c1..c4 of y = sum c_k x^k (no constant: r(0) = 0 and theta(0) = 0)."""
    basis = np.stack([x**k for k in range(1, FTHETA_DEGREE + 1)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return [0.0, *map(float, coef)]


def _chebyshev_nodes(hi: float, n: int = 400) -> np.ndarray:
    # Nodes crowd at both ends: the fit's worst error is about half that of evenly spaced samples.
    return hi * (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n))


def corner_radius(width: float, height: float, cx: float, cy: float) -> float:
    """Pixel distance from the principal point to the farthest image corner."""
    return max(math.hypot(x - cx, y - cy) for x in (0.0, width) for y in (0.0, height))


def ftheta_row(
    width: int,
    height: int,
    cx: float,
    cy: float,
    fw_poly: Sequence[float],
    bw_poly: Sequence[float] | None = None,
) -> Row:
    """An intrinsics row; ``bw_poly`` (pixel radius -> angle) is fitted from ``fw_poly`` when not given."""
    fw = [float(c) for c in fw_poly]
    if bw_poly is None:
        # Invert fw on a dense table up to the image corner (fw must rise there), then fit the inverse.
        theta = np.linspace(0.0, math.pi, 20_001)
        radius = np.polynomial.polynomial.polyval(theta, fw)
        falls = np.flatnonzero(np.diff(radius) <= 0)
        stop = int(falls[0]) + 1 if len(falls) else len(theta)
        r_max = min(corner_radius(width, height, cx, cy), float(radius[stop - 1]))
        r_nodes = _chebyshev_nodes(r_max)
        bw = _fit_through_origin(r_nodes, np.interp(r_nodes, radius[:stop], theta[:stop]))
        dense = np.linspace(0.0, r_max, 2001)
        err = np.abs(
            np.polynomial.polynomial.polyval(np.polynomial.polynomial.polyval(dense, bw), fw) - dense
        )
        if err.max() > PINHOLE_WARN_PX:
            log.warning(
                f"the fitted bw_poly misses fw_poly's inverse by up to {err.max():.1f} px: give bw_poly"
            )
    else:
        bw = [float(c) for c in bw_poly]
    row: Row = {"width": int(width), "height": int(height), "cx": float(cx), "cy": float(cy)}
    return row | dict(zip(BW_POLY, bw, strict=True)) | dict(zip(FW_POLY, fw, strict=True))


def pinhole_row(width: int, height: int, cx: float, cy: float, focal: float) -> tuple[Row, float]:
    """A pinhole camera (r = f tan(theta)) as the closest f-theta row; returns (row, worst error in px).

    The error grows with the field of view: at 1920x1080 it is ~0.1 px for 60 deg horizontal FOV,
    ~0.7 px for 90 deg, ~4 px for 120 deg (a degree-4 polynomial cannot follow tan towards 90 deg).
    """
    corner = corner_radius(width, height, cx, cy)
    theta_max = math.atan(corner / focal)
    theta, radius = _chebyshev_nodes(theta_max), _chebyshev_nodes(corner)
    fw = _fit_through_origin(theta, focal * np.tan(theta))
    bw = _fit_through_origin(radius, np.arctan(radius / focal))
    dense_t, dense_r = np.linspace(0, theta_max, 2001), np.linspace(0, corner, 2001)
    err = max(
        float(np.abs(np.polynomial.polynomial.polyval(dense_t, fw) - focal * np.tan(dense_t)).max()),
        float(np.abs(focal * np.tan(np.polynomial.polynomial.polyval(dense_r, bw)) - dense_r).max()),
    )
    return ftheta_row(width, height, cx, cy, fw, bw), err


def _number(block: dict, key: str, where: str) -> float:
    value = block.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _intrinsics(block: Any, where: str) -> Row:
    if not isinstance(block, dict):
        raise UserError(f"{where} must be an object with model, width, height, cx, cy, ...")
    width, height = (int(_number(block, k, where)) for k in ("width", "height"))
    cx, cy = _number(block, "cx", where), _number(block, "cy", where)
    model = block.get("model", "ftheta")
    if model == "pinhole":
        fx, fy = _number(block, "fx", where), _number(block, "fy", where)
        if abs(fx - fy) > 0.01 * max(fx, fy):
            raise UserError(
                f"{where}: fx {fx} and fy {fy} differ by over 1%: resample the frames to square pixels"
            )
        row, err = pinhole_row(width, height, cx, cy, (fx + fy) / 2)
        if err > PINHOLE_WARN_PX:
            log.warning(f"{where}: pinhole as f-theta is off by up to {err:.1f} px at the image corners")
        return row
    if model != "ftheta":
        raise UserError(f'{where}: model {model!r} is unknown: use "ftheta" or "pinhole"')
    fw = [_number(block, k, where) for k in FW_POLY]
    has_bw = [k in block for k in BW_POLY]
    if any(has_bw) and not all(has_bw):
        raise UserError(f"{where}: give all of bw_poly_0..{FTHETA_DEGREE} or none (then they are fitted)")
    bw = [_number(block, k, where) for k in BW_POLY] if all(has_bw) else None
    return ftheta_row(width, height, cx, cy, fw, bw)


def read_calibration_json(path: Path) -> Calibration:
    """Parse a clip's ``calibration.json``; anything malformed is a UserError naming the field."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): fix it (docs/CLIPS.md)") from exc
    cameras = data.get("cameras") if isinstance(data, dict) else None
    if not isinstance(cameras, dict) or not cameras:
        raise UserError(
            f'{path}: expected {{"cameras": {{"<camera>": {{"intrinsics": ..., "extrinsics": ...}}}}}}'
        )
    intrinsics, extrinsics = {}, {}
    for cam, entry in cameras.items():
        where = f"{path} camera {cam}"
        if not isinstance(entry, dict) or "intrinsics" not in entry or "extrinsics" not in entry:
            raise UserError(f"{where}: needs both intrinsics and extrinsics")
        intrinsics[cam] = _intrinsics(entry["intrinsics"], f"{where} intrinsics")
        extr = entry["extrinsics"]
        if not isinstance(extr, dict):
            raise UserError(f"{where} extrinsics must be an object with {', '.join(EXTRINSICS_COLUMNS)}")
        row = {k: _number(extr, k, f"{where} extrinsics") for k in EXTRINSICS_COLUMNS}
        norm = math.hypot(*(row[k] for k in ("qx", "qy", "qz", "qw")))
        if norm < 1e-6:
            raise UserError(f"{where} extrinsics: the quaternion qx, qy, qz, qw is zero")
        if abs(norm - 1.0) > 1e-9:  # unit quaternions stay bit-exact; others are normalised
            row |= {k: row[k] / norm for k in ("qx", "qy", "qz", "qw")}
        extrinsics[cam] = row
    return Calibration(intrinsics, extrinsics)


def calibration_json(calibration: Calibration) -> dict[str, Any]:
    """The ``calibration.json`` content of a Calibration (f-theta rows, dataset column names)."""
    return {
        "cameras": {
            cam: {
                "intrinsics": {"model": "ftheta", **calibration.intrinsics[cam]},
                "extrinsics": calibration.extrinsics[cam],
            }
            for cam in calibration.cameras
        }
    }


# ----------------------------------------------------------------------------- readers
def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def egomotion_from_table(df: pd.DataFrame, where: str) -> Any:
    """The dev kit's egomotion interpolator from an own-format table (timestamp_us + rig -> world pose)."""
    from physical_ai_av import egomotion
    from scipy.spatial.transform import Rotation

    missing = [c for c in EGO_REQUIRED if c not in df.columns]
    if missing:
        raise BadClip(f"bad egomotion: {where} lacks column(s) {', '.join(missing)}")
    if len(df) < 2:
        raise BadClip(f"bad egomotion: {where} has {len(df)} row(s)")
    ts = df["timestamp_us"].to_numpy()
    if not np.issubdtype(ts.dtype, np.integer) or np.any(np.diff(ts) <= 0):
        raise BadClip(f"bad egomotion: timestamp_us in {where} must be integers, strictly increasing")
    table = df.rename(columns={"timestamp_us": "timestamp"}).astype({"timestamp": np.int64})
    if any(c not in table.columns for c in EGO_DERIVED):
        # Velocity and acceleration in the rig frame (x forward), curvature in 1/m; only poses are read here.
        t = ts.astype(np.float64) / 1e6
        rot = Rotation.from_quat(table[["qx", "qy", "qz", "qw"]].to_numpy(dtype=np.float64))
        vel = np.gradient(table[["x", "y", "z"]].to_numpy(dtype=np.float64), t, axis=0)
        acc = np.gradient(vel, t, axis=0)
        yaw = np.unwrap(rot.as_euler("xyz")[:, 2])
        derived = np.concatenate([rot.inv().apply(vel), rot.inv().apply(acc)], axis=1)
        speed = np.linalg.norm(vel[:, :2], axis=1)
        curvature = np.gradient(yaw, t) / np.maximum(speed, 0.5)  # below ~0.5 m/s heading change is noise
        for i, name in enumerate(EGO_DERIVED):
            if name not in table.columns:
                table[name] = curvature if name == "curvature" else derived[:, i]
    return egomotion.EgomotionState.from_egomotion_df(table).create_interpolator(
        table["timestamp"].to_numpy(copy=True)
    )


class FrameFolderReader(VideoReader):
    """``<timestamp_us>.jpg|png`` files read with the dev kit's timestamp rule (its VideoReader base class)."""

    def __init__(self, files: list[Path], timestamps: np.ndarray) -> None:
        super().__init__(video_data=None, timestamps=timestamps)  # checks strictly increasing timestamps
        self.files = files

    def decode_images_from_frame_indices(self, frame_indices: np.ndarray) -> np.ndarray:
        from PIL import Image

        frames = []
        for i in np.asarray(frame_indices).reshape(-1):
            with Image.open(self.files[int(i)]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"frames of different sizes in {self.files[0].parent}")
        return np.stack(frames)


def open_frame_folder(folder: Path, camera: str) -> FrameFolderReader:
    files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadClip(f"missing {camera}: {folder} holds no <timestamp_us>.jpg|png frames")
    bad = [f.name for f in files if not f.stem.isdigit()]
    if bad:
        raise BadClip(f"unreadable video {camera}: frame {bad[0]!r} is not named <timestamp_us>.jpg|png")
    files.sort(key=lambda f: int(f.stem))
    try:
        return FrameFolderReader(files, np.array([int(f.stem) for f in files], dtype=np.int64))
    except ValueError as exc:  # duplicate timestamps, or a single frame
        raise BadClip(f"unreadable video {camera}: {folder.name}/ frame timestamps: {exc}") from exc


class ClipFolderSource:
    """A folder in the own-clips format (docs/CLIPS.md); implements ``ClipSource``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ids = read_manifest(self.root)
        self.description = f"own clips {self.root}"

    def clip_ids(self) -> list[str]:
        return list(self.ids)

    def _folder(self, clip_id: str, feature: str) -> Path:
        folder = self.root / check_clip_id(clip_id, self.root / MANIFEST)
        if not folder.is_dir():
            raise BadClip(f"missing {feature}: clip folder {folder} does not exist")
        return folder

    def egomotion(self, clip_id: str) -> Any:
        path = find_table(self._folder(clip_id, EGOMOTION), EGOMOTION)
        if path is None:
            raise BadClip(f"missing {EGOMOTION}: no {clip_id}/egomotion.parquet|csv")
        try:
            df = read_table(path)
        except Exception as exc:  # pyarrow / csv parser errors on a damaged file
            raise BadClip(
                f"bad egomotion: {path.name} unreadable ({type(exc).__name__}: {str(exc)[:80]})"
            ) from exc
        return egomotion_from_table(df, f"{clip_id}/{path.name}")

    def camera(self, clip_id: str, camera: str) -> Any:
        folder = self._folder(clip_id, camera)
        video = folder / f"{camera}.mp4"
        if video.is_file():
            ts_path = find_table(folder, f"{camera}.timestamps")
            if ts_path is None:
                raise BadClip(f"missing {camera}: {camera}.mp4 has no {camera}.timestamps.parquet|csv")
            from physical_ai_av.video import SeekVideoReader

            try:
                ts = read_table(ts_path)["timestamp_us"].to_numpy(dtype=np.int64, copy=True)
                return SeekVideoReader(video_data=io.BytesIO(video.read_bytes()), timestamps=ts)
            except Exception as exc:  # container/codec errors, missing column, bad timestamps
                raise BadClip(f"unreadable video {camera}: {type(exc).__name__}: {str(exc)[:80]}") from exc
        if (folder / camera).is_dir():
            return open_frame_folder(folder / camera, camera)
        raise BadClip(f"missing {camera}: neither {camera}.mp4 nor a {camera}/ frame folder in {clip_id}/")

    def calibration(self, clip_id: str) -> Calibration | None:
        path = self.root / check_clip_id(clip_id, self.root / MANIFEST) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            return read_calibration_json(path)
        except UserError as exc:  # never fail a sample for its calibration; say why it is ignored
            log.warning(f"ignoring calibration: {exc}")
            return None
