"""The synthetic clips' cameras: their mounts and lenses as a calibration in the dataset's format, and
frames rendered THROUGH the dev kit's camera model with that calibration (lane lines and road edges of the
path driven next projected with ``FThetaCameraModel.ray2pixel``; the sky/road split where each pixel's ray
points above or below the horizon), encoded as the dataset's videos."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np

from alpamayo_cache.data.source import EXTRINSICS_COLUMNS, Calibration

FPS = 10
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


def encode_video(frames: np.ndarray) -> bytes:
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


def corrupt_video(i: int) -> bytes:
    return b"\x00\x00\x00\x18ftypmp42" + bytes(
        np.random.default_rng(i).integers(0, 256, 4096, dtype=np.uint8)
    )
