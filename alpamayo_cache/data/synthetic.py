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
from alpamayo_cache.errors import UserError

GENERATOR_VERSION = 3  # 2: calibration, frames through the camera model; 3: routes.json, rear cameras
FPS = 10
EGO_HZ = 20
PATH_HZ = 100  # drive() integrates at 100 Hz
AHEAD = 600  # path samples drawn ahead of the car: the next 6 s of driving
# Camera mounts: yaw (deg, left +), pitch (deg, down +), position in the rig frame (m), and lens: half the
# horizontal field of view (deg) and the f-theta cubic term relative to the linear one (barrel).
CAMERA_RIGS: dict[str, tuple[float, float, tuple[float, float, float], float, float]] = {
    "camera_cross_left_120fov": (60.0, 10.0, (2.0, 0.9, 1.35), 60.0, -0.04),
    "camera_front_wide_120fov": (0.0, 10.0, (1.75, 0.0, 1.45), 60.0, -0.04),
    "camera_cross_right_120fov": (-60.0, 10.0, (2.0, -0.9, 1.35), 60.0, -0.04),
    "camera_front_tele_30fov": (0.0, 3.0, (1.75, 0.1, 1.45), 15.0, 0.0),
    # The rear ring (1.5's 7-camera set, 2 Super's 6): they look back, so they see the sky/road split of
    # their own lens; the lanes drawn are the path ahead, which lies outside their view.
    "camera_rear_left_70fov": (150.0, 8.0, (1.0, 0.9, 1.4), 35.0, -0.02),
    "camera_rear_tele_30fov": (180.0, 3.0, (-0.8, 0.0, 1.5), 15.0, 0.0),
    "camera_rear_right_70fov": (-150.0, 8.0, (1.0, -0.9, 1.4), 35.0, -0.02),
}
DEFAULT_RIG = CAMERA_RIGS["camera_front_wide_120fov"]  # any other camera name looks ahead like the wide one
# Optical frame (x right, y down, z out of the lens) -> rig frame (x forward, y left, z up); columns are
# the optical axes in rig coordinates.
OPTICAL_TO_RIG = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
SKY, ROAD = (150, 190, 235), (70, 70, 75)
LANES = ((1.75, (240, 240, 240)), (-1.75, (240, 240, 240)), (5.25, (230, 200, 60)), (-5.25, (230, 200, 60)))
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


def clip_calibration(clip_id: str, cameras: tuple[str, ...], size: tuple[int, int]) -> Calibration:
    """The clip's camera calibration: the nominal rigs plus small per-vehicle tolerances (deterministic)."""
    from scipy.spatial.transform import Rotation

    from alpamayo_cache.data.clip_folder import ftheta_row

    h, w = size
    rng = np.random.default_rng(int(hashlib.md5(f"calibration-{clip_id}".encode()).hexdigest()[:8], 16))
    intrinsics, extrinsics = {}, {}
    for cam in cameras:
        yaw, pitch, (x, y, z), half_fov, cubic = CAMERA_RIGS.get(cam, DEFAULT_RIG)
        jitter = rng.uniform(
            -1.0, 1.0, 5
        )  # mounting yaw/pitch (0.5 deg), height (3 cm), focal (1%), cx (0.5 px)
        theta = math.radians(half_fov)
        k1 = (w / 2) / (theta + cubic * theta**3) * (1.0 + 0.01 * jitter[3])  # px per rad on the axis
        intrinsics[cam] = ftheta_row(w, h, w / 2 + 0.5 * jitter[4], h / 2, [0.0, k1, 0.0, cubic * k1, 0.0])
        rotation = (
            Rotation.from_euler("z", yaw + 0.5 * jitter[0], degrees=True)
            * Rotation.from_euler("y", pitch + 0.5 * jitter[1], degrees=True)  # +y pitches the lens down
            * Rotation.from_matrix(OPTICAL_TO_RIG)
        )
        pose = [*rotation.as_quat(canonical=True), x, y, z + 0.03 * jitter[2]]
        extrinsics[cam] = dict(zip(EXTRINSICS_COLUMNS, map(float, pose), strict=True))
    return Calibration(intrinsics, extrinsics)


def lane_points(path_: dict[str, np.ndarray], n_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lane lines (+-1.75 m) and road edges (+-5.25 m) along the next 6 s of the driven path, for frames
    at t = k / FPS: (rig-frame points [n, 3] on the ground (z = 0) at each frame's time, frame [n], lane [n]).
    """
    n_path = len(path_["t"])
    now = np.minimum(np.round(np.arange(n_frames) * PATH_HZ / FPS).astype(int), n_path - 1)
    ahead = now[:, None] + np.arange(AHEAD)[None, :]  # [f, a] path indices
    frame, step = np.nonzero(ahead < n_path)  # the path ends with the clip
    idx, here = ahead[frame, step], now[frame]
    offset = np.array([o for o, _ in LANES])[:, None]  # [lanes, 1] metres to the left of the path
    dx = path_["x"][idx] - offset * np.sin(path_["yaw"][idx]) - path_["x"][here]  # [lanes, n] world frame
    dy = path_["y"][idx] + offset * np.cos(path_["yaw"][idx]) - path_["y"][here]
    c, s = np.cos(path_["yaw"][here]), np.sin(path_["yaw"][here])
    rig = np.stack([c * dx + s * dy, -s * dx + c * dy, np.zeros_like(dx)], axis=-1).reshape(-1, 3)
    lane = np.repeat(np.arange(len(LANES)), len(idx))
    return rig, np.tile(frame, len(LANES)), lane


def render_camera(
    points: tuple[np.ndarray, np.ndarray, np.ndarray], camera: str, calibration: Calibration, n_frames: int
) -> np.ndarray:
    """One camera's frames, uint8 [n_frames, H, W, 3], drawn through the dev kit's camera model.

    Sky where a pixel's ray (``pixel2ray``, rotated into the rig frame) points above the horizon, road
    below; the ``lane_points`` go rig -> camera (inverse extrinsics) -> pixels (``ray2pixel``) as 2x2 dots.
    """
    from alpamayo_cache.data.clip_folder import corner_radius

    model = calibration.camera_model(camera)
    to_rig = calibration.sensor_pose(camera)  # camera -> rig
    h, w = int(model.height), int(model.width)
    v, u = np.mgrid[0:h, 0:w]
    centres = np.stack([u + 0.5, v + 0.5], axis=-1).reshape(-1, 2).astype(np.float64)  # pixel k: [k, k+1)
    with np.errstate(invalid="ignore", divide="ignore"):
        up = to_rig.rotation.apply(np.nan_to_num(model.pixel2ray(centres)))[:, 2] > 0
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    frames[:] = np.where(up.reshape(h, w, 1), np.array(SKY, np.uint8), np.array(ROAD, np.uint8))

    rig, frame, lane = points
    cam = to_rig.inv().apply(rig)
    theta = np.arctan2(np.hypot(cam[:, 0], cam[:, 1]), cam[:, 2])  # angle off the optical axis
    theta_max = float(model.r2th(corner_radius(w, h, *model.principal_point)))  # calibrated range only
    keep = theta <= theta_max
    with np.errstate(invalid="ignore", divide="ignore"):
        pixels = model.ray2pixel(cam[keep])
    col, row = (np.floor(np.nan_to_num(pixels[:, i], nan=-1.0)).astype(int) for i in (0, 1))
    inside = (col >= 0) & (col < w - 1) & (row >= 0) & (row < h - 1)  # dots are 2 x 2 pixels
    frame, col, row = frame[keep][inside], col[inside], row[inside]
    colours = np.array([c for _, c in LANES], dtype=np.uint8)[lane[keep][inside]]
    for du in (0, 1):
        for dv in (0, 1):
            frames[frame, row + dv, col + du] = colours
    return frames


def _encode_video(frames: np.ndarray) -> bytes:
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # mbtree off: with it x264 gave different bytes run to run for the same frames (~1 video in 4,
        # threads or not); veryfast: ~40% less time than the default preset at about the same size.
        stream.options = {
            "g": str(FPS),
            "crf": "18",
            "preset": "veryfast",
            "threads": "1",
            "x264-params": "mbtree=0",
        }
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _corrupt_video(i: int) -> bytes:
    return b"\x00\x00\x00\x18ftypmp42" + bytes(
        np.random.default_rng(i).integers(0, 256, 4096, dtype=np.uint8)
    )


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
        stamps = _frame_timestamps(plan)
        points = lane_points(trajectory, len(stamps))
        for cam in cameras:
            if plan.fault == "missing_camera" and cam == cameras[0]:
                presence[plan.clip_id][cam] = False
                continue
            cam_zip = f"camera/{cam}/{cam}.chunk_{chunk:04d}.zip"
            if plan.fault == "corrupt_video" and cam == cameras[0]:
                video = _corrupt_video(i)
            else:
                video = _encode_video(render_camera(points, cam, calibration, len(stamps)))
            archives.setdefault(cam_zip, {})[f"{plan.clip_id}.{cam}.mp4"] = video
            archives[cam_zip][f"{plan.clip_id}.{cam}.timestamps.parquet"] = _parquet_bytes(
                pd.DataFrame({"timestamp": stamps})
            )
    for rel, members in archives.items():
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                zf.writestr(
                    zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data
                )  # same bytes every run
    for chunk, by_clip in calibrations.items():
        for feature, table in zip(
            (CAMERA_INTRINSICS, SENSOR_EXTRINSICS), _calibration_tables(by_clip), strict=True
        ):
            target = snap / "calibration" / feature / f"{feature}.chunk_{chunk:04d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(target)
    _features_table(cameras).to_csv(snap / "features.csv")
    (snap / "metadata").mkdir(exist_ok=True)
    ids = [p.clip_id for p in plans]
    pd.DataFrame(presence).T.rename_axis("clip_id").to_parquet(snap / "metadata" / "feature_presence.parquet")
    pd.DataFrame({"country": ["synthetic"] * len(ids)}, index=pd.Index(ids, name="clip_id")).to_parquet(
        snap / "metadata" / "data_collection.parquet"
    )
    scenario = pd.DataFrame(
        {
            "scenario": [p.scenario for p in plans],
            "curvature": [p.curvature for p in plans],
            "fault": [p.fault or "" for p in plans],
        },
        index=pd.Index(ids, name="clip_id"),
    )
    scenario.to_parquet(snap / "metadata" / "synthetic_scenarios.parquet")
    (snap / SYNTHETIC_ROUTES).write_text(json.dumps(synthetic_routes(plans), indent=1) + "\n")
    # clip_index last: its presence marks a complete dataset.
    pd.DataFrame(
        {"chunk": [i // clips_per_chunk for i in range(len(ids))]}, index=pd.Index(ids, name="clip_id")
    ).to_parquet(snap / "clip_index.parquet")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


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
        points = lane_points(trajectory, len(stamps))
        for cam in cameras:
            if plan.fault == "missing_camera" and cam == cameras[0]:
                continue
            broken = plan.fault == "corrupt_video" and cam == cameras[0]
            frames = None if broken else render_camera(points, cam, calibration, len(stamps))
            if image_format == "mp4":
                (folder / f"{cam}.mp4").write_bytes(_corrupt_video(i) if broken else _encode_video(frames))
                table(pd.DataFrame({"timestamp_us": stamps}), folder / f"{cam}.timestamps")
                continue
            from PIL import Image

            (folder / cam).mkdir(exist_ok=True)
            for k, stamp in enumerate(stamps):
                target = folder / cam / f"{stamp}.{image_format}"
                if broken:
                    target.write_bytes(b"not an image")
                else:
                    Image.fromarray(frames[k]).save(target, quality=95)  # quality: jpg only
    cf.write_manifest(root, [p.clip_id for p in plans])  # last: its presence marks a complete folder
    return root
