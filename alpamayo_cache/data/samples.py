"""From clips to samples: keyframe policies, camera sets, the train/val split, and sample loading.

A sample is one keyframe t0 of one clip under one camera configuration:
- images: uint8 [cameras, frames, H, W, 3] at t0 - 0.3, -0.2, -0.1, 0 s (camera-major);
- ego history (16 poses ending at t0) and future (64 poses, 0.1 .. 6.4 s), in the ego frame at t0:
  x forward, y left, z up, metres;
- on request, the front-wide camera's frame at t0 resized from the decoded native frame (the rewards
  of reward-weighted fine-tuning look at it; it is decoded even when the camera set masks that camera,
  since it scores the scene, not what the model saw).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass

import numpy as np

from alpamayo_cache.config import ALL_CAMERAS, CAMERA_IDS, ModelConfig
from alpamayo_cache.data.camera_model import FRONT_CAMERA
from alpamayo_cache.data.ego_frame import ego_frame_trajectory
from alpamayo_cache.data.source import BadClip, ClipSource
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.pixels import resize_frames
from alpamayo_cache.store.format import check_id

US = 1_000_000
DEFAULT_T0_US = 5_100_000
FUTURE_STEPS = 64
STEP_US = 100_000
MIN_T0_US = 1_600_001  # t0 must exceed 1.6 s (release loader)


@dataclass(frozen=True)
class CameraSet:
    """Which cameras the prompt shows, and which of them are blacked out."""

    name: str
    cameras: tuple[str, ...]
    masked: frozenset[str] = frozenset()


def camera_id(camera: str) -> int:
    """The release camera id (1.5 / 2 Super loaders) of a dataset camera name."""
    if camera not in CAMERA_IDS:
        raise UserError(
            f"camera {camera!r} has no release camera id: labelled prompts know {sorted(CAMERA_IDS)}"
        )
    return CAMERA_IDS[camera]


def _listed_cameras(name: str) -> tuple[str, ...]:
    """``cameras:<c>[+<c>...]`` with c a camera id (0-6) or a dataset camera name -> names ordered by id."""
    by_id = {str(i): cam for cam, i in CAMERA_IDS.items()}
    chosen = []
    for item in (c for c in name[len("cameras:") :].split("+") if c):
        cam = by_id.get(item, item)
        if cam not in CAMERA_IDS:
            raise UserError(
                f"unknown camera {item!r} in camera set {name!r}: use ids 0-6 or names {sorted(CAMERA_IDS)}"
            )
        chosen.append(cam)
    if not chosen or len(set(chosen)) != len(chosen):
        raise UserError(f"camera set {name!r} must list 1-7 different cameras, e.g. cameras:0+1+2+6")
    return tuple(sorted(chosen, key=CAMERA_IDS.__getitem__))


def camera_set(name: str, model_cameras: tuple[str, ...]) -> CameraSet:
    """``default`` | ``front-only`` | ``cameras:<c>[+<c>...]`` (1-7 cameras by id or name, ordered by
    id as the 1.5 loader orders them) | ``mask:<cam>[+<cam>...]`` (chosen cameras become black frames)."""
    if name == "default":
        return CameraSet(name, tuple(model_cameras))
    if name == "front-only":
        return CameraSet(name, ("camera_front_wide_120fov",))
    if name.startswith("cameras:"):
        return CameraSet(name, _listed_cameras(name))
    if name.startswith("mask:"):
        masked = frozenset(c for c in name[5:].split("+") if c)
        unknown = sorted(masked - set(ALL_CAMERAS) - set(CAMERA_IDS))
        if unknown:
            raise UserError(
                f"unknown camera {unknown[0]!r} in camera set {name!r}; cameras are {sorted(CAMERA_IDS)}"
            )
        if not masked <= set(model_cameras):
            raise UserError(
                f"camera set {name!r} masks cameras the model does not read ({list(model_cameras)})"
            )
        return CameraSet(name, tuple(model_cameras), masked)
    raise UserError(
        f"unknown camera set {name!r}: use default, front-only, cameras:<id>[+<id>], or mask:<camera>[+<camera>]"
    )


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
    front: np.ndarray | None = None  # uint8 [h, w, 3] front-wide camera at t0 (when asked for and readable)


def valid_t0_range(ego, cfg: ModelConfig) -> tuple[int, int]:
    """[first, last] keyframe (us) with full history, all camera frames and 6.4 s of future."""
    start, end = (int(v) for v in (ego.timestamps[0], ego.timestamps[-1]))
    back = max(cfg.history_steps - 1, cfg.frames_per_camera - 1) * STEP_US
    # The release's loader also refuses t0 <= 1.6 s on the clip's clock, whatever the egomotion holds.
    return max(start + back, MIN_T0_US), end - FUTURE_STEPS * STEP_US


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
    grid = np.arange(-(-first // STEP_US) * STEP_US, last + 1, STEP_US, dtype=np.int64)  # on the 0.1 s grid
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
    """The clip's egomotion interpolator; undecodable egomotion becomes a BadClip.

    Non-finite poses make numpy warn (``invalid value encountered in det``) while the dev kit builds
    its transforms: such a table is refused here instead of letting the raw warning reach the user."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            return source.egomotion(clip_id)
    except BadClip:
        raise
    except RuntimeWarning as exc:
        raise BadClip(f"bad egomotion: non-finite or degenerate poses in the table ({exc})") from None
    except Exception as exc:  # parquet/scipy errors on damaged poses
        raise BadClip(f"bad egomotion: {type(exc).__name__}: {str(exc)[:80]}") from exc


def check_egomotion_gaps(ego, t0_us: int, cfg: ModelConfig, max_gap_s: float) -> None:
    """Refuse a keyframe whose history or future window has no egomotion rows for longer than
    ``max_gap_s``: the interpolator would silently bridge the gap with a made-up path."""
    ts = np.asarray(ego.timestamps, dtype=np.int64)
    lo = t0_us - (cfg.history_steps - 1) * STEP_US
    hi = t0_us + FUTURE_STEPS * STEP_US
    first = max(int(np.searchsorted(ts, lo, side="right")) - 1, 0)
    last = min(int(np.searchsorted(ts, hi, side="left")), len(ts) - 1)
    window = ts[first : last + 1]
    if len(window) < 2:
        return
    gaps = np.diff(window)
    worst = int(gaps.argmax())
    if gaps[worst] > max_gap_s * US:
        raise BadClip(
            f"egomotion gap: no poses for {gaps[worst] / US:.2f} s from {window[worst] / US:.2f} s, inside the "
            f"window of t0 {t0_us / US:.2f} s (limit {max_gap_s} s, --max-ego-gap-s)"
        )


def load_sample(
    source: ClipSource,
    spec: SampleSpec,
    cfg: ModelConfig,
    ego=None,
    max_gap_s: float = 0.35,
    front_hw: tuple[int, int] | None = None,
) -> Sample:
    """Decode one sample; any problem with the clip raises BadClip with the reason. ``front_hw``:
    also keep the front-wide camera's frame at t0 at that size (None if that camera cannot be read
    while the prompt does not need it)."""
    cams = camera_set(spec.camera_set, cfg.cameras)
    ego = ego if ego is not None else read_egomotion(source, spec.clip_id)
    first, last = valid_t0_range(ego, cfg)
    if not first <= spec.t0_us <= last:
        raise BadClip(
            f"too short: t0 {spec.t0_us / US:.1f} s is outside the valid range {first / US:.1f}-{last / US:.1f} s"
        )
    check_egomotion_gaps(ego, spec.t0_us, cfg, max_gap_s)
    hist_xyz, hist_rot, fut_xyz, fut_rot = ego_frame_trajectory(
        ego, spec.t0_us, cfg.history_steps, FUTURE_STEPS, STEP_US
    )
    frame_t = spec.t0_us - STEP_US * np.arange(cfg.frames_per_camera - 1, -1, -1, dtype=np.int64)
    h, w = cfg.image_size
    images = np.zeros((len(cams.cameras), cfg.frames_per_camera, h, w, 3), dtype=np.uint8)
    front = None
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
        if cam == FRONT_CAMERA and front_hw is not None:
            front = resize_frames(frames[-1:], front_hw)[0]  # the same decoded frame at t0
    if front_hw is not None and front is None:
        front = _front_frame(source, spec, frame_t[-1:], front_hw)
    return Sample(spec, images, hist_xyz, hist_rot, fut_xyz, fut_rot, front)


def _front_frame(
    source: ClipSource, spec: SampleSpec, t0: np.ndarray, size: tuple[int, int]
) -> np.ndarray | None:
    """The front-wide frame at t0 when the prompt did not decode it (masked or not shown); None when
    the clip has no readable front camera: the rewards then score it as unknown."""
    try:
        frames, _ = source.camera(spec.clip_id, FRONT_CAMERA).decode_images_from_timestamps(t0)
        return resize_frames(frames[-1:], size)[0]
    except Exception:  # a missing or broken camera the prompt does not need is not a bad clip
        return None


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
            check_id(clip_id)
        except UserError as exc:  # ids become folder names: a bad one is this clip's failure, not a crash
            failures.append((clip_id[:200], str(exc)))
            continue
        try:
            ego = read_egomotion(source, clip_id)
            t0s = keyframes(policy, ego, cfg)
        except BadClip as exc:
            failures.append((clip_id, str(exc)))
            continue
        split = split_of(clip_id, val_percent)
        specs += [SampleSpec(clip_id, t0, name, split) for t0 in t0s for name in camera_sets]
    return specs, failures
