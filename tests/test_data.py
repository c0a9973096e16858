"""Reading clips: both sides of the dev-kit seam, keyframes, camera sets, split, bad clips."""

from __future__ import annotations

import numpy as np
import pytest

from alpamayo_cache.config import TINY
from alpamayo_cache.data.samples import (
    DEFAULT_T0_US,
    SampleSpec,
    camera_set,
    keyframes,
    load_sample,
    path_curvature,
    plan_samples,
    split_of,
)
from alpamayo_cache.data.source import BadClip, DevKitSource, FolderSource, find_snapshot, open_source
from alpamayo_cache.data.synthetic import plan_clips
from alpamayo_cache.errors import UserError


def test_devkit_and_folder_reader_agree(synthetic_data):
    devkit = open_source(synthetic_data)
    folder = open_source(synthetic_data, reader="folder")
    assert isinstance(devkit, DevKitSource) and isinstance(folder, FolderSource)
    assert devkit.clip_ids() == folder.clip_ids()
    clip = devkit.clip_ids()[1]
    ts = np.array([1_000_000, 5_100_000, 9_000_000])
    a, b = devkit.egomotion(clip)(ts).pose, folder.egomotion(clip)(ts).pose
    np.testing.assert_array_equal(a.translation, b.translation)
    np.testing.assert_array_equal(a.rotation.as_quat(), b.rotation.as_quat())
    fa, _ = devkit.camera(clip, "camera_front_wide_120fov").decode_images_from_timestamps(ts)
    fb, _ = folder.camera(clip, "camera_front_wide_120fov").decode_images_from_timestamps(ts)
    np.testing.assert_array_equal(fa, fb)
    # The snapshot folder itself is a plain-folder copy of the dataset.
    cache_dir, revision = find_snapshot(synthetic_data)
    plain = open_source(
        cache_dir / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles" / "snapshots" / revision,
        reader="folder",
    )
    assert plain.clip_ids() == devkit.clip_ids()


def test_sample_is_in_the_ego_frame(synthetic_data):
    source = open_source(synthetic_data)
    plans = plan_clips(9, seed=0)
    left = next(p for p in plans if p.scenario == "left" and p.curvature > 0.05)
    sample = load_sample(source, SampleSpec(left.clip_id, 5_500_000, "default", "train"), TINY)
    np.testing.assert_allclose(sample.hist_xyz[-1], 0, atol=1e-5)
    np.testing.assert_allclose(sample.hist_rot[-1], np.eye(3), atol=1e-5)
    assert sample.hist_xyz[0, 0] < -5  # 1.5 s ago we were ~10 m behind
    assert sample.fut_xyz[-1, 0] > 10 and sample.fut_xyz[-1, 1] > 5  # ahead and to the left
    with pytest.raises(BadClip, match="too short"):
        load_sample(source, SampleSpec(left.clip_id, 7_000_000, "default", "train"), TINY)
    assert sample.images.shape == (4, 2, 64, 96, 3)  # cameras, frames, H, W, RGB


def test_keyframe_policies(synthetic_data):
    source = open_source(synthetic_data)
    turn = next(p for p in plan_clips(9, seed=0) if p.scenario != "straight")
    ego = source.egomotion(turn.clip_id)
    assert keyframes("default", ego, TINY) == [DEFAULT_T0_US]
    stride = keyframes("stride:1", ego, TINY)
    assert (
        stride[0] == 1_700_000  # the release refuses t0 <= 1.6 s
        and np.all(np.diff(stride) == 1_000_000)
        and stride[-1] <= 12_000_000 - 6_400_000
    )
    (best,) = keyframes("max-curvature", ego, TINY)
    grid = np.arange(stride[0], stride[-1] + 1, 100_000)
    assert abs(path_curvature(ego, np.array([best])))[0] >= abs(path_curvature(ego, grid)).max() - 1e-9
    assert best >= 5_500_000  # the curve is fully entered at 5.5 s
    with pytest.raises(UserError, match="unknown keyframe policy"):
        keyframes("nope", ego, TINY)


def test_camera_sets():
    assert camera_set("default", TINY.cameras).cameras == TINY.cameras
    assert camera_set("front-only", TINY.cameras).cameras == ("camera_front_wide_120fov",)
    masked = camera_set("mask:camera_cross_left_120fov", TINY.cameras)
    assert masked.masked == {"camera_cross_left_120fov"}
    with pytest.raises(UserError, match="unknown camera 'camera_roof'"):
        camera_set("mask:camera_roof", TINY.cameras)
    with pytest.raises(UserError, match="unknown camera set"):
        camera_set("all-of-them", TINY.cameras)


def test_masked_camera_is_black(synthetic_data):
    source = open_source(synthetic_data)
    clip = source.clip_ids()[0]
    sample = load_sample(
        source, SampleSpec(clip, DEFAULT_T0_US, "mask:camera_cross_left_120fov", "train"), TINY
    )
    assert sample.images[0].max() == 0 and sample.images[1].max() > 0


def test_split_is_deterministic_and_about_ten_percent():
    ids = [f"clip-{i}" for i in range(4000)]
    val = [split_of(c) for c in ids].count("val") / len(ids)
    assert 0.08 < val < 0.12
    assert [split_of(c) for c in ids[:50]] == [split_of(c) for c in ids[:50]]


def test_bad_clips_get_reasons(faulty_data):
    source = open_source(faulty_data)
    specs, failures = plan_samples(source, TINY, source.clip_ids(), "default", ["default"])
    assert sorted(reason.split(":")[0] for _, reason in failures) == ["bad egomotion", "too short"]
    reasons = {}
    for spec in specs:
        try:
            load_sample(source, spec, TINY)
        except BadClip as exc:
            reasons[spec.clip_id] = str(exc).split(":")[0]
    assert sorted(reasons.values()) == [
        "missing camera_cross_left_120fov",
        "unreadable video camera_cross_left_120fov",
    ]


def test_dataset_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(UserError, match="not a PhysicalAI-AV folder"):
        open_source(tmp_path)
