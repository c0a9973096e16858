"""From clips to samples: keyframe policies, camera sets, the train/val split, and sample loading.

A sample is one keyframe t0 of one clip under one camera configuration:
- images: uint8 [cameras, frames, H, W, 3] at t0 - 0.3, -0.2, -0.1, 0 s (camera-major);
- ego history (16 poses ending at t0) and future (64 poses, 0.1 .. 6.4 s), in the ego frame at t0:
  x forward, y left, z up, metres.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from alpamayo_cache.config import ALL_CAMERAS, ModelConfig
from alpamayo_cache.data.source import BadClip, ClipSource
from alpamayo_cache.errors import UserError

US = 1_000_000
DEFAULT_T0_US = 5_100_000
FUTURE_STEPS = 64
STEP_US = 100_000


@dataclass(frozen=True)
class CameraSet:
    """Which cameras the prompt shows, and which of them are blacked out."""

    name: str
    cameras: tuple[str, ...]
    masked: frozenset[str] = frozenset()


def camera_set(name: str, model_cameras: tuple[str, ...]) -> CameraSet:
    """``default`` | ``front-only`` | ``mask:<cam>[+<cam>...]`` (chosen cameras become black frames)."""
    if name == "default":
        return CameraSet(name, tuple(model_cameras))
    if name == "front-only":
        return CameraSet(name, ("camera_front_wide_120fov",))
    if name.startswith("mask:"):
        masked = frozenset(c for c in name[5:].split("+") if c)
        unknown = sorted(masked - set(ALL_CAMERAS))
        if unknown:
            raise UserError(
                f"unknown camera {unknown[0]!r} in camera set {name!r}; cameras are {list(ALL_CAMERAS)}"
            )
        if not masked <= set(model_cameras):
            raise UserError(
                f"camera set {name!r} masks cameras the model does not read ({list(model_cameras)})"
            )
        return CameraSet(name, tuple(model_cameras), masked)
    raise UserError(f"unknown camera set {name!r}: use default, front-only, or mask:<camera>[+<camera>]")


def split_of(clip_id: str, val_percent: int = 10) -> str:
    """Deterministic split from a hash of the clip id (stable across machines and runs)."""
    bucket = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) % 100
    return "val" if bucket < val_percent else "train"


@dataclass(frozen=True)
class SampleSpec:
    clip_id: str
    t0_us: int
    camera_set: str
    split: str

    @property
    def sample_id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.camera_set).strip("-")
        return f"{self.clip_id}__{self.t0_us}__{slug}"


@dataclass
class Sample:
    spec: SampleSpec
    images: np.ndarray  # uint8 [c, f, H, W, 3]
    hist_xyz: np.ndarray  # float32 [16, 3]
    hist_rot: np.ndarray  # float32 [16, 3, 3]
    fut_xyz: np.ndarray  # float32 [64, 3]
    fut_rot: np.ndarray  # float32 [64, 3, 3]


def valid_t0_range(ego, cfg: ModelConfig) -> tuple[int, int]:
    """[first, last] keyframe (us) with full history, all camera frames and 6.4 s of future."""
    start, end = (int(v) for v in (ego.timestamps[0], ego.timestamps[-1]))
    back = max(cfg.history_steps - 1, cfg.frames_per_camera - 1) * STEP_US
    return start + back, end - FUTURE_STEPS * STEP_US


def check_policy(policy: str) -> None:
    """Refuse an unknown keyframe policy up front."""
    if policy in ("default", "max-curvature"):
        return
    if policy.startswith("stride:"):
        try:
            if float(policy.split(":", 1)[1]) > 0:
                return
        except ValueError:
            pass
        raise UserError(f"keyframe policy {policy!r}: stride must be positive seconds, e.g. stride:2")
    raise UserError(f"unknown keyframe policy {policy!r}: use default, max-curvature or stride:<seconds>")


def keyframes(policy: str, ego, cfg: ModelConfig) -> list[int]:
    """t0 values (us) for one clip. ``default`` (5.1 s), ``max-curvature``, ``stride:<seconds>``."""
    first, last = valid_t0_range(ego, cfg)
    if last < first:
        span = (int(ego.timestamps[-1]) - int(ego.timestamps[0])) / US
        need = (max(cfg.history_steps - 1, cfg.frames_per_camera - 1) * STEP_US + FUTURE_STEPS * STEP_US) / US
        raise BadClip(f"too short: {span:.1f} s of egomotion, needs {need:.1f} s for history + 6.4 s future")
    if policy == "default":
        if not first <= DEFAULT_T0_US <= last:
            raise BadClip(
                f"too short: no t0 = 5.1 s with 6.4 s of future (valid t0 {first / US:.1f}-{last / US:.1f} s)"
            )
        return [DEFAULT_T0_US]
    grid = np.arange(first, last + 1, STEP_US, dtype=np.int64)
    if policy == "max-curvature":
        curvature = np.abs(path_curvature(ego, grid))
        return [int(grid[int(np.nanargmax(curvature))])]
    check_policy(policy)
    stride = float(policy.split(":", 1)[1])
    return [int(t) for t in grid[:: max(1, int(round(stride * US / STEP_US)))]]


def path_curvature(ego, timestamps: np.ndarray) -> np.ndarray:
    """Signed curvature (1/m) of the driven path around each timestamp, from poses 0.1 s apart."""
    before = ego(timestamps - STEP_US).pose
    after = ego(timestamps + STEP_US).pose
    yaw_before = before.rotation.as_euler("xyz")[:, 2]
    yaw_after = after.rotation.as_euler("xyz")[:, 2]
    dyaw = np.angle(np.exp(1j * (yaw_after - yaw_before)))
    ds = np.linalg.norm(after.translation[:, :2] - before.translation[:, :2], axis=-1)
    return dyaw / np.maximum(ds, 0.5)  # below ~2.5 m/s the heading is noise; do not divide by ~0


def read_egomotion(source: ClipSource, clip_id: str):
    """The clip's egomotion interpolator; undecodable egomotion becomes a BadClip."""
    try:
        return source.egomotion(clip_id)
    except BadClip:
        raise
    except Exception as exc:  # parquet/scipy errors on damaged or non-finite poses
        raise BadClip(f"bad egomotion: {type(exc).__name__}: {str(exc)[:80]}") from exc


def ego_frame_trajectory(ego, t0_us: int, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """History and future poses in the ego frame at t0."""
    first, last = valid_t0_range(ego, cfg)
    if not first <= t0_us <= last:
        raise BadClip(
            f"too short: t0 {t0_us / US:.1f} s is outside the valid range {first / US:.1f}-{last / US:.1f} s"
        )
    hist_t = t0_us + STEP_US * np.arange(-(cfg.history_steps - 1), 1, dtype=np.int64)
    fut_t = t0_us + STEP_US * np.arange(1, FUTURE_STEPS + 1, dtype=np.int64)
    try:
        hist, fut = ego(hist_t).pose, ego(fut_t).pose
    except Exception as exc:  # scipy refuses non-finite rotations (SVD does not converge)
        raise BadClip(f"bad egomotion: NaN/inf poses around the keyframe ({type(exc).__name__})") from exc
    t0_rot = hist.rotation[-1]
    t0_xyz = hist.translation[-1]
    inv = t0_rot.inv()
    out = (
        inv.apply(hist.translation - t0_xyz),
        (inv * hist.rotation).as_matrix(),
        inv.apply(fut.translation - t0_xyz),
        (inv * fut.rotation).as_matrix(),
    )
    out = tuple(np.asarray(a, dtype=np.float32) for a in out)
    if not all(np.isfinite(a).all() for a in out):
        raise BadClip("bad egomotion: NaN/inf poses around the keyframe")
    return out


def load_sample(source: ClipSource, spec: SampleSpec, cfg: ModelConfig, ego=None) -> Sample:
    """Decode one sample; any problem with the clip raises BadClip with the reason."""
    cams = camera_set(spec.camera_set, cfg.cameras)
    ego = ego if ego is not None else read_egomotion(source, spec.clip_id)
    hist_xyz, hist_rot, fut_xyz, fut_rot = ego_frame_trajectory(ego, spec.t0_us, cfg)
    frame_t = spec.t0_us - STEP_US * np.arange(cfg.frames_per_camera - 1, -1, -1, dtype=np.int64)
    h, w = cfg.image_size
    images = np.zeros((len(cams.cameras), cfg.frames_per_camera, h, w, 3), dtype=np.uint8)
    for i, cam in enumerate(cams.cameras):
        if cam in cams.masked:
            continue  # black frames: the camera is deliberately hidden from the model
        try:
            reader = source.camera(spec.clip_id, cam)
            frames, _ = reader.decode_images_from_timestamps(frame_t)
        except BadClip:
            raise
        except Exception as exc:  # the video decoder's errors vary (InvalidData, EOF, ValueError)
            raise BadClip(f"unreadable video {cam}: {type(exc).__name__}: {str(exc)[:80]}") from exc
        images[i] = resize_frames(frames, (h, w))
    return Sample(spec, images, hist_xyz, hist_rot, fut_xyz, fut_rot)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of uint8 frames [n, H, W, 3] to the model's input size."""
    import torch
    import torch.nn.functional as F

    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def plan_samples(
    source: ClipSource,
    cfg: ModelConfig,
    clip_ids: list[str],
    policy: str,
    camera_sets: list[str],
    val_percent: int = 10,
) -> tuple[list[SampleSpec], list[tuple[str, str]]]:
    """Specs for every (clip, keyframe, camera set); clips whose keyframes fail go to failures."""
    for name in camera_sets:
        camera_set(name, cfg.cameras)  # validate names before any work
    specs: list[SampleSpec] = []
    failures: list[tuple[str, str]] = []
    for clip_id in clip_ids:
        try:
            ego = read_egomotion(source, clip_id)
            t0s = keyframes(policy, ego, cfg)
        except BadClip as exc:
            failures.append((clip_id, str(exc)))
            continue
        split = split_of(clip_id, val_percent)
        specs += [SampleSpec(clip_id, t0, name, split) for t0 in t0s for name in camera_sets]
    return specs, failures


def is_turn(fut_rot: np.ndarray, threshold_deg: float = 15.0) -> bool:
    yaw = math.degrees(math.atan2(fut_rot[-1, 1, 0], fut_rot[-1, 0, 0]))
    return abs(yaw) > threshold_deg
