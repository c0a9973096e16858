"""A small synthetic PhysicalAI-AV dataset, written in the real on-disk format.

It is laid out as a Hugging Face hub cache (``datasets--nvidia--PhysicalAI-Autonomous-Vehicles/
snapshots/<revision>/``) so the real dev kit reads it unchanged offline; the snapshot folder itself is
also a valid plain-folder copy. ``write_clip_folder`` writes the same clips in the own-clips format
(docs/CLIPS.md) instead.

Clips drive straight or through left/right curves of several sharpnesses. Each clip carries a camera
calibration in the dataset's format (f-theta intrinsics per camera, camera -> rig extrinsics; slightly
different per clip, as per vehicle), and every frame is rendered THROUGH the dev kit's camera model with
that calibration: the lane lines and road edges along the path actually driven next are projected with
``FThetaCameraModel.ray2pixel`` after the rig -> camera transform, and the sky/road split is where each
pixel's ray (``pixel2ray``) points above or below the horizon. Images and calibration agree exactly.

Faults can be injected per clip (missing camera, corrupt video, too short, NaN egomotion) to test how
bad input is handled. Beside the clips, ``metadata/routes.json`` gives a navigation route per clip (the
turn its scenario takes; every fourth clip has none), for the models that read a route (data/routes.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alpamayo_cache.config import ALL_CAMERAS
from alpamayo_cache.data.routes import SYNTHETIC_ROUTES, scenario_route
from alpamayo_cache.data.source import (
    CACHE_REPO_DIR,
    CAMERA_INTRINSICS,
    EGOMOTION,
    EXTRINSICS_COLUMNS,
    INTRINSICS_COLUMNS,
    SENSOR_EXTRINSICS,
    Calibration,
)
from alpamayo_cache.data.synthetic_render import (
    FPS,
    PATH_HZ,
    clip_calibration,
    corrupt_video,
    encode_video,
    lane_points,
    render_camera,
)
from alpamayo_cache.errors import UserError

GENERATOR_VERSION = 3  # 2: calibration, frames through the camera model; 3: routes.json, rear cameras
EGO_HZ = 20
FAULTS = ("missing_camera", "corrupt_video", "short", "nan_egomotion")


@dataclass(frozen=True)
class ClipPlan:
    clip_id: str
    scenario: str  # straight | left | right
    curvature: float  # 1/m, signed, held after the turn-in
    speed: float  # m/s at the start
    duration_s: float
    fault: str | None = None


def revision_for(seed: int, **params: object) -> str:
    """The snapshot revision: a hash of everything that shapes the files, so changed arguments regenerate."""
    key = json.dumps({"version": GENERATOR_VERSION, "seed": seed, **params}, sort_keys=True, default=str)
    return hashlib.sha1(f"alpamayo-cache-synthetic-{key}".encode()).hexdigest()


def plan_clips(n_clips: int, seed: int = 0, faults: dict[str, str] | None = None) -> list[ClipPlan]:
    """Cycle straight / left / right with gentle and sharp curvatures (1/m); ``faults`` maps fault -> clip index."""
    rng = np.random.default_rng(seed)
    by_index = {int(i): f for f, i in (faults or {}).items()}
    plans = []
    for i in range(n_clips):
        scenario = ("straight", "left", "right")[i % 3]
        # Turn sharpness cycles gentle / sharp / sharper so every split sees each kind.
        magnitude = (0.025, 0.06, 0.09)[(i // 3) % 3] if scenario != "straight" else 0.0
        sign = 1.0 if scenario == "left" else -1.0
        fault = by_index.get(i)
        clip_id = str(hashlib.md5(f"{seed}-{i}".encode()).hexdigest())
        clip_id = f"{clip_id[:8]}-{clip_id[8:12]}-{clip_id[12:16]}-{clip_id[16:20]}-{clip_id[20:32]}"
        plans.append(
            ClipPlan(
                clip_id=clip_id,
                scenario=scenario,
                curvature=sign * magnitude,
                speed=float(rng.uniform(6.0, 10.0)),
                duration_s=6.0 if fault == "short" else 12.0,
                fault=fault,
            )
        )
    return plans


def drive(plan: ClipPlan, hz: int = 100) -> dict[str, np.ndarray]:
    """Integrate a unicycle at ``hz``: time (s), x, y, yaw, speed, accel, curvature (world frame).

    Turns ramp in between 3.5 s and 5.5 s (so the default keyframe, 5.1 s, sees the curve begin) and
    ramp out over 1.5 s once the heading has changed by 90 degrees, like a junction or a bend.
    Sharper turns are driven slower (lateral acceleration stays below ~4 m/s^2).
    """
    n = int(plan.duration_s * hz) + 1
    t = np.arange(n) / hz
    speed0 = plan.speed * (1.0 - 3.0 * abs(plan.curvature))
    accel = 0.3 * np.sin(t / 3.0)
    speed = speed0 + np.concatenate([[0.0], np.cumsum(accel[:-1]) / hz])
    curvature = np.zeros(n)
    yaw = np.zeros(n)
    yaw[0] = (int(plan.clip_id[:6], 16) % 628) / 100.0  # an arbitrary world heading: tests the ego transform
    exit_start = None
    for i in range(n - 1):
        ramp_in = min(max((t[i] - 3.5) / 2.0, 0.0), 1.0)
        if exit_start is None and abs(yaw[i] - yaw[0]) >= math.pi / 2 - 0.35:
            exit_start = t[i]
        ramp_out = 1.0 if exit_start is None else max(1.0 - (t[i] - exit_start) / 1.5, 0.0)
        curvature[i] = plan.curvature * ramp_in * ramp_out
        yaw[i + 1] = yaw[i] + speed[i] * curvature[i] / hz
    x = 100.0 + np.concatenate([[0.0], np.cumsum(speed[:-1] * np.cos(yaw[:-1])) / hz])
    y = -50.0 + np.concatenate([[0.0], np.cumsum(speed[:-1] * np.sin(yaw[:-1])) / hz])
    return {"t": t, "x": x, "y": y, "yaw": yaw, "speed": speed, "accel": accel, "curvature": curvature}


def synthetic_routes(plans: list[ClipPlan]) -> dict[str, str]:
    """clip_id -> route: the scenario's turn, metres from the default keyframe (5.1 s) to the end of
    the turn-in (5.5 s); every fourth clip has no route (samples without one)."""
    return {p.clip_id: scenario_route(p.scenario, 0.4 * p.speed) for i, p in enumerate(plans) if i % 4 != 3}


def egomotion_table(path_: dict[str, np.ndarray], fault: str | None) -> pd.DataFrame:
    """The dataset's egomotion table at 20 Hz: rig -> world pose, velocity, acceleration, curvature."""
    sel = slice(None, None, PATH_HZ // EGO_HZ)
    yaw = path_["yaw"][sel]
    speed = path_["speed"][sel]
    df = pd.DataFrame(
        {
            "timestamp": np.round(path_["t"][sel] * 1e6).astype(np.int64),
            "x": path_["x"][sel],
            "y": path_["y"][sel],
            "z": np.full_like(yaw, 0.5),  # the road is the plane z = 0.5 of this world frame
            "qx": np.zeros_like(yaw),
            "qy": np.zeros_like(yaw),
            "qz": np.sin(yaw / 2),
            "qw": np.cos(yaw / 2),
            "vx": speed,
            "vy": np.zeros_like(yaw),
            "vz": np.zeros_like(yaw),
            "ax": path_["accel"][sel],
            "ay": speed**2 * path_["curvature"][sel],
            "az": np.zeros_like(yaw),
            "curvature": path_["curvature"][sel],
        }
    )
    if fault == "nan_egomotion":
        df.loc[len(df) // 2 : len(df) // 2 + 3, ["x", "y"]] = np.nan
    return df


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


def _frame_timestamps(plan: ClipPlan) -> np.ndarray:
    return (np.arange(int(plan.duration_s * FPS) + 1) * (1_000_000 // FPS)).astype(np.int64)


def _features_table(cameras: tuple[str, ...]) -> pd.DataFrame:
    rows = [
        {
            "feature": cam,
            "directory": "camera",
            "chunk_path": f"camera/{cam}/{cam}.chunk_{{chunk_id:04d}}.zip",
            "clip_files_in_zip": json.dumps(
                {
                    "video": f"{{clip_id}}.{cam}.mp4",
                    "frame_timestamps": f"{{clip_id}}.{cam}.timestamps.parquet",
                }
            ),
        }
        for cam in cameras
    ]
    rows.append(
        {
            "feature": EGOMOTION,
            "directory": "labels",
            "chunk_path": "labels/egomotion/egomotion.chunk_{chunk_id:04d}.zip",
            "clip_files_in_zip": json.dumps({"egomotion": "{clip_id}.egomotion.parquet"}),
        }
    )
    # Calibration features are per-chunk parquet tables (no zip members), as in the real features.csv.
    for feature in (CAMERA_INTRINSICS, SENSOR_EXTRINSICS):
        rows.append(
            {
                "feature": feature,
                "directory": "calibration",
                "chunk_path": f"calibration/{feature}/{feature}.chunk_{{chunk_id:04d}}.parquet",
                "clip_files_in_zip": None,
            }
        )
    return pd.DataFrame(rows).set_index("feature")


def _calibration_tables(calibrations: dict[str, Calibration]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows indexed (clip_id, camera_name) / (clip_id, sensor_name), the dataset's table layout."""
    intr = [((clip, cam), row) for clip, cal in calibrations.items() for cam, row in cal.intrinsics.items()]
    extr = [((clip, cam), row) for clip, cal in calibrations.items() for cam, row in cal.extrinsics.items()]
    tables = []
    for rows, name, columns in (
        (intr, "camera_name", INTRINSICS_COLUMNS),
        (extr, "sensor_name", EXTRINSICS_COLUMNS),
    ):
        index = pd.MultiIndex.from_tuples([k for k, _ in rows], names=["clip_id", name])
        tables.append(pd.DataFrame([r for _, r in rows], index=index)[list(columns)])
    tables[0] = tables[0].astype({"width": np.int64, "height": np.int64})
    return tables[0], tables[1]


def camera_renders(plan: ClipPlan, cameras: tuple[str, ...], calibration: Calibration, trajectory: dict):
    """(camera, frames [f, H, W, 3] or None when the clip's fault breaks that camera's video) for every
    camera the clip has (a ``missing_camera`` fault drops the first one)."""
    stamps = _frame_timestamps(plan)
    points = lane_points(trajectory, len(stamps))
    for cam in cameras:
        if plan.fault == "missing_camera" and cam == cameras[0]:
            continue
        broken = plan.fault == "corrupt_video" and cam == cameras[0]
        yield cam, None if broken else render_camera(points, cam, calibration, len(stamps))


def write_dataset(
    out: Path,
    n_clips: int = 12,
    seed: int = 0,
    cameras: tuple[str, ...] = ALL_CAMERAS,
    size: tuple[int, int] = (96, 160),
    faults: dict[str, str] | None = None,
    clips_per_chunk: int = 4,
) -> Path:
    """Write the dataset under ``out`` as a hub cache; returns the snapshot folder."""
    revision = revision_for(
        seed, n_clips=n_clips, cameras=list(cameras), size=list(size), faults=faults, chunk=clips_per_chunk
    )
    repo = Path(out) / CACHE_REPO_DIR
    snap = repo / "snapshots" / revision
    if (snap / "clip_index.parquet").is_file():
        return snap  # already written (deterministic in its arguments)
    snap.mkdir(parents=True, exist_ok=True)
    plans = plan_clips(n_clips, seed, faults)
    features = (*cameras, EGOMOTION, CAMERA_INTRINSICS, SENSOR_EXTRINSICS)
    presence = {p.clip_id: {feat: True for feat in features} for p in plans}
    archives: dict[str, dict[str, bytes]] = {}
    calibrations: dict[int, dict[str, Calibration]] = {}
    for i, plan in enumerate(plans):
        chunk = i // clips_per_chunk
        trajectory = drive(plan)
        ego_zip = f"labels/egomotion/egomotion.chunk_{chunk:04d}.zip"
        archives.setdefault(ego_zip, {})[f"{plan.clip_id}.egomotion.parquet"] = _parquet_bytes(
            egomotion_table(trajectory, plan.fault)
        )
        calibration = clip_calibration(plan.clip_id, cameras, size)
        calibrations.setdefault(chunk, {})[plan.clip_id] = calibration
        if plan.fault == "missing_camera":
            presence[plan.clip_id][cameras[0]] = False
        stamps = pd.DataFrame({"timestamp": _frame_timestamps(plan)})
        for cam, frames in camera_renders(plan, cameras, calibration, trajectory):
            members = archives.setdefault(f"camera/{cam}/{cam}.chunk_{chunk:04d}.zip", {})
            members[f"{plan.clip_id}.{cam}.mp4"] = (
                corrupt_video(i) if frames is None else encode_video(frames)
            )
            members[f"{plan.clip_id}.{cam}.timestamps.parquet"] = _parquet_bytes(stamps)
    _write_archives(snap, archives)
    _write_calibration(snap, calibrations)
    _write_metadata(snap, plans, presence, cameras)
    # clip_index last: its presence marks a complete dataset.
    ids = [p.clip_id for p in plans]
    pd.DataFrame(
        {"chunk": [i // clips_per_chunk for i in range(len(ids))]}, index=pd.Index(ids, name="clip_id")
    ).to_parquet(snap / "clip_index.parquet")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def _write_archives(snap: Path, archives: dict[str, dict[str, bytes]]) -> None:
    for rel, members in archives.items():
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in members.items():  # a fixed date: the same bytes every run
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def _write_calibration(snap: Path, calibrations: dict[int, dict[str, Calibration]]) -> None:
    for chunk, by_clip in calibrations.items():
        for feature, table in zip(
            (CAMERA_INTRINSICS, SENSOR_EXTRINSICS), _calibration_tables(by_clip), strict=True
        ):
            target = snap / "calibration" / feature / f"{feature}.chunk_{chunk:04d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(target)


def _write_metadata(snap: Path, plans: list[ClipPlan], presence: dict, cameras: tuple[str, ...]) -> None:
    _features_table(cameras).to_csv(snap / "features.csv")
    (snap / "metadata").mkdir(exist_ok=True)
    ids = pd.Index([p.clip_id for p in plans], name="clip_id")
    pd.DataFrame(presence).T.rename_axis("clip_id").to_parquet(snap / "metadata" / "feature_presence.parquet")
    pd.DataFrame({"country": ["synthetic"] * len(ids)}, index=ids).to_parquet(
        snap / "metadata" / "data_collection.parquet"
    )
    scenario = pd.DataFrame(
        {
            "scenario": [p.scenario for p in plans],
            "curvature": [p.curvature for p in plans],
            "fault": [p.fault or "" for p in plans],
        },
        index=ids,
    )
    scenario.to_parquet(snap / "metadata" / "synthetic_scenarios.parquet")
    (snap / SYNTHETIC_ROUTES).write_text(json.dumps(synthetic_routes(plans), indent=1) + "\n")


def write_clip_folder(
    out: Path,
    n_clips: int = 12,
    seed: int = 0,
    cameras: tuple[str, ...] = ALL_CAMERAS,
    size: tuple[int, int] = (96, 160),
    faults: dict[str, str] | None = None,
    image_format: str = "mp4",
    table_format: str = "parquet",
) -> Path:
    """The same clips (plans, calibration, renders) in the own-clips format (docs/CLIPS.md); returns ``out``.

    ``image_format``: mp4 (+ timestamps table) | png | jpg (a frame folder per camera);
    ``table_format``: parquet | csv for the egomotion and timestamps tables.
    """
    from alpamayo_cache.data import clip_folder as cf

    if image_format not in ("mp4", "png", "jpg") or table_format not in ("parquet", "csv"):
        raise UserError(
            f"clip folder formats: images mp4|png|jpg, tables parquet|csv (got {image_format}, {table_format})"
        )
    root = Path(out)
    plans = plan_clips(n_clips, seed, faults)
    if (root / cf.MANIFEST).is_file():  # written last: the folder is complete
        if cf.read_manifest(root) != [p.clip_id for p in plans]:
            raise UserError(
                f"{root} already holds other clips: write the synthetic clips into an empty folder"
            )
        return root

    def table(df: pd.DataFrame, stem: Path) -> None:
        if table_format == "parquet":
            df.to_parquet(stem.with_name(f"{stem.name}.parquet"), index=False)
        else:  # 17 significant digits: floats read back bit-exact
            df.to_csv(stem.with_name(f"{stem.name}.csv"), index=False, float_format="%.17g")

    for i, plan in enumerate(plans):
        folder = root / plan.clip_id
        folder.mkdir(parents=True, exist_ok=True)
        trajectory = drive(plan)
        ego = egomotion_table(trajectory, plan.fault).rename(columns={"timestamp": "timestamp_us"})
        table(ego[list(cf.EGO_REQUIRED)], folder / EGOMOTION)
        calibration = clip_calibration(plan.clip_id, cameras, size)
        (folder / cf.CALIBRATION_FILE).write_text(
            json.dumps(cf.calibration_json(calibration), indent=1) + "\n"
        )
        stamps = _frame_timestamps(plan)
        for cam, frames in camera_renders(plan, cameras, calibration, trajectory):
            if image_format == "mp4":
                video = corrupt_video(i) if frames is None else encode_video(frames)
                (folder / f"{cam}.mp4").write_bytes(video)
                table(pd.DataFrame({"timestamp_us": stamps}), folder / f"{cam}.timestamps")
            else:
                _write_frames(folder / cam, stamps, frames, image_format)
    cf.write_manifest(root, [p.clip_id for p in plans])  # last: its presence marks a complete folder
    return root


def _write_frames(folder: Path, stamps: np.ndarray, frames: np.ndarray | None, image_format: str) -> None:
    """One image per frame named by its timestamp; a broken camera (None) gets unreadable files."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for k, stamp in enumerate(stamps):
        target = folder / f"{stamp}.{image_format}"
        if frames is None:
            target.write_bytes(b"not an image")
        else:
            Image.fromarray(frames[k]).save(target, quality=95)  # quality: jpg only
