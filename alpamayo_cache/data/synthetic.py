"""A small synthetic PhysicalAI-AV dataset, written in the real on-disk format.

It is laid out as a Hugging Face hub cache (``datasets--nvidia--PhysicalAI-Autonomous-Vehicles/
snapshots/<revision>/``) so the real dev kit reads it unchanged offline; the snapshot folder itself is
also a valid plain-folder copy. Clips drive straight or through left/right curves of several
sharpnesses; each camera video renders a road whose lane lines follow the path actually driven next,
seen from that camera's mounting yaw, so the images carry the information the expert needs.

Faults can be injected per clip (missing camera, corrupt video, too short, NaN egomotion) to test how
bad input is handled.
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
from alpamayo_cache.data.source import CACHE_REPO_DIR, EGOMOTION

FPS = 10
EGO_HZ = 20
# Mounting yaw (rad, left positive) and focal length (in image widths) of each camera.
CAMERA_RIGS = {
    "camera_cross_left_120fov": (math.radians(60), 0.35),
    "camera_front_wide_120fov": (0.0, 0.35),
    "camera_cross_right_120fov": (math.radians(-60), 0.35),
    "camera_front_tele_30fov": (0.0, 1.8),
}
FAULTS = ("missing_camera", "corrupt_video", "short", "nan_egomotion")


@dataclass(frozen=True)
class ClipPlan:
    clip_id: str
    scenario: str  # straight | left | right
    curvature: float  # 1/m, signed, held after the turn-in
    speed: float  # m/s at the start
    duration_s: float
    fault: str | None = None


def revision_for(seed: int) -> str:
    return hashlib.sha1(f"alpamayo-cache-synthetic-{seed}".encode()).hexdigest()


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


def _egomotion_parquet(path_: dict[str, np.ndarray], fault: str | None) -> bytes:
    step = int(100 / EGO_HZ)
    sel = slice(None, None, step)
    yaw = path_["yaw"][sel]
    speed = path_["speed"][sel]
    df = pd.DataFrame(
        {
            "timestamp": np.round(path_["t"][sel] * 1e6).astype(np.int64),
            "x": path_["x"][sel],
            "y": path_["y"][sel],
            "z": np.full_like(yaw, 0.5),
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
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


def render_frame(path_: dict[str, np.ndarray], t_s: float, camera: str, size: tuple[int, int]) -> np.ndarray:
    """Road seen by ``camera`` at time ``t_s``: lane lines along the next ~40 m of the driven path."""
    h, w = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    horizon = h // 3
    img[:horizon] = (150, 190, 235)  # sky
    img[horizon:] = (70, 70, 75)  # asphalt
    mount_yaw, focal = CAMERA_RIGS.get(camera, (0.0, 0.35))
    f = focal * w
    i0 = int(round(t_s * 100))
    ahead = slice(i0, min(i0 + 600, len(path_["t"])))
    cx, cy, cyaw = path_["x"][i0], path_["y"][i0], path_["yaw"][i0]
    px, py, pyaw = path_["x"][ahead], path_["y"][ahead], path_["yaw"][ahead]
    for offset, colour in (
        (1.75, (240, 240, 240)),
        (-1.75, (240, 240, 240)),
        (5.25, (230, 200, 60)),
        (-5.25, (230, 200, 60)),
    ):
        lx = px - offset * np.sin(pyaw) - cx
        ly = py + offset * np.cos(pyaw) - cy
        # Into the camera frame: ego yaw, then the camera's mounting yaw.
        ang = cyaw + mount_yaw
        fwd = np.cos(ang) * lx + np.sin(ang) * ly
        lat = -np.sin(ang) * lx + np.cos(ang) * ly
        keep = fwd > 1.0
        u = (w / 2 - f * lat[keep] / fwd[keep]).astype(int)
        v = (horizon + f * 1.5 / fwd[keep]).astype(int)
        ok = (u >= 0) & (u < w - 1) & (v >= horizon) & (v < h - 1)
        u, v = u[ok], v[ok]
        for du in (0, 1):
            for dv in (0, 1):
                img[v + dv, u + du] = colour
    return img


def _encode_video(frames: list[np.ndarray]) -> bytes:
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"g": str(FPS), "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _timestamps_parquet(n: int) -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"timestamp": (np.arange(n) * (1_000_000 // FPS)).astype(np.int64)}).to_parquet(buf)
    return buf.getvalue()


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
    return pd.DataFrame(rows).set_index("feature")


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
    revision = revision_for(seed)
    repo = Path(out) / CACHE_REPO_DIR
    snap = repo / "snapshots" / revision
    if (snap / "clip_index.parquet").is_file():
        return snap  # already written (deterministic in its arguments)
    snap.mkdir(parents=True, exist_ok=True)
    plans = plan_clips(n_clips, seed, faults)
    presence = {p.clip_id: {feat: True for feat in (*cameras, EGOMOTION)} for p in plans}
    archives: dict[str, dict[str, bytes]] = {}
    for i, plan in enumerate(plans):
        chunk = i // clips_per_chunk
        trajectory = drive(plan)
        ego_zip = f"labels/egomotion/egomotion.chunk_{chunk:04d}.zip"
        archives.setdefault(ego_zip, {})[f"{plan.clip_id}.egomotion.parquet"] = _egomotion_parquet(
            trajectory, plan.fault
        )
        n_frames = int(plan.duration_s * FPS) + 1
        for cam in cameras:
            if plan.fault == "missing_camera" and cam == cameras[0]:
                presence[plan.clip_id][cam] = False
                continue
            cam_zip = f"camera/{cam}/{cam}.chunk_{chunk:04d}.zip"
            if plan.fault == "corrupt_video" and cam == cameras[0]:
                video = b"\x00\x00\x00\x18ftypmp42" + bytes(
                    np.random.default_rng(i).integers(0, 256, 4096, dtype=np.uint8)
                )
            else:
                video = _encode_video([render_frame(trajectory, k / FPS, cam, size) for k in range(n_frames)])
            archives.setdefault(cam_zip, {})[f"{plan.clip_id}.{cam}.mp4"] = video
            archives[cam_zip][f"{plan.clip_id}.{cam}.timestamps.parquet"] = _timestamps_parquet(n_frames)
    for rel, members in archives.items():
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
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
    # clip_index last: its presence marks a complete dataset.
    pd.DataFrame(
        {"chunk": [i // clips_per_chunk for i in range(len(ids))]}, index=pd.Index(ids, name="clip_id")
    ).to_parquet(snap / "clip_index.parquet")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap
