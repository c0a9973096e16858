"""Own clips (docs/CLIPS.md) and calibration: read-back, failures, malformed roots, the dev kit, end to end."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alpamayo_cache.config import TINY
from alpamayo_cache.data import clip_folder as cf
from alpamayo_cache.data.samples import SampleSpec, keyframes, load_sample, plan_samples
from alpamayo_cache.data.source import BadClip, DevKitSource, FolderSource, open_source
from alpamayo_cache.data.synthetic import drive, plan_clips, write_clip_folder
from alpamayo_cache.data.synthetic_render import clip_calibration, lane_points, render_camera
from alpamayo_cache.errors import UserError
from tests.conftest import TINY_CAMERAS, precompute_cfg

FRONT = "camera_front_wide_120fov"
SIZE = (96, 160)


@pytest.fixture(scope="module")
def clips_mp4(tmp_path_factory) -> Path:
    return write_clip_folder(
        tmp_path_factory.mktemp("clips") / "mp4", n_clips=3, seed=0, cameras=TINY_CAMERAS
    )


@pytest.fixture(scope="module")
def clips_png(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips") / "png"
    return write_clip_folder(
        root, n_clips=3, seed=0, cameras=TINY_CAMERAS, image_format="png", table_format="csv"
    )


def test_written_clips_read_back(clips_mp4, clips_png):
    plans = plan_clips(3, seed=0)
    mp4, png = open_source(clips_mp4), open_source(clips_png)
    assert isinstance(mp4, cf.ClipFolderSource) and mp4.clip_ids() == [p.clip_id for p in plans]
    clip = plans[1].clip_id
    table = pd.read_parquet(clips_mp4 / clip / "egomotion.parquet")
    assert list(table.columns) == list(cf.EGO_REQUIRED)
    ts = table["timestamp_us"].to_numpy()
    for source in (mp4, png):  # parquet and csv tables give the same values
        pose = source.egomotion(clip)(ts).pose
        np.testing.assert_array_equal(pose.translation, table[["x", "y", "z"]].to_numpy())
        quat = pose.rotation.as_quat(canonical=True)
        np.testing.assert_allclose(quat, table[["qx", "qy", "qz", "qw"]].to_numpy(), atol=1e-15)
    # The synthetic drive is along its heading at its speed: derived rig-frame velocity ~ (speed, 0, 0).
    speed = drive(plans[1])["speed"][500]
    np.testing.assert_allclose(
        mp4.egomotion(clip)(np.array([5_000_000])).velocity[0], [speed, 0, 0], atol=0.02
    )
    # Calibration: JSON round trip is exact.
    assert mp4.calibration(clip) == clip_calibration(clip, TINY_CAMERAS, SIZE) == png.calibration(clip)
    # Frames: png is lossless (exactly the render), mp4 is close to it.
    calibration = clip_calibration(clip, TINY_CAMERAS, SIZE)
    rendered = render_camera(lane_points(drive(plans[1]), 121), FRONT, calibration, 121)[51]
    at = np.array([5_100_000])
    (a,), _ = png.camera(clip, FRONT).decode_images_from_timestamps(at)
    (b,), _ = mp4.camera(clip, FRONT).decode_images_from_timestamps(at)
    np.testing.assert_array_equal(a, rendered)
    assert np.abs(b.astype(int) - rendered).mean() < 4
    sample = load_sample(png, SampleSpec(clip, 5_100_000, "default", "train"), TINY)
    assert sample.images.shape == (4, 2, 64, 96, 3) and sample.fut_xyz[-1, 0] > 20


def test_frame_folder_follows_the_video_timestamp_rule(clips_mp4, clips_png):
    clip = plan_clips(3, seed=0)[0].clip_id
    video, frames = open_source(clips_mp4).camera(clip, FRONT), open_source(clips_png).camera(clip, FRONT)
    assert isinstance(frames, cf.FrameFolderReader)
    asked = np.array([0, 1, 99_999, 100_000, 150_000, 5_149_999, 12_000_000])
    _, got_video = video.decode_images_from_timestamps(asked)
    _, got_frames = frames.decode_images_from_timestamps(asked)
    # The frame at or before each request (frames every 100 ms).
    np.testing.assert_array_equal(got_video, [0, 0, 0, 100_000, 100_000, 5_100_000, 12_000_000])
    np.testing.assert_array_equal(got_frames, got_video)
    for reader in (video, frames):
        with pytest.raises(ValueError, match="within the range"):
            reader.decode_images_from_timestamps(np.array([12_000_001]))


def test_images_agree_with_the_calibration(clips_png):
    """Through the dev kit's objects built from calibration.json: lane, road and sky where projected."""
    source = open_source(clips_png)
    straight = plan_clips(3, seed=0)[0]
    assert straight.scenario == "straight"
    calibration = source.calibration(straight.clip_id)
    model, to_rig = calibration.camera_model(FRONT), calibration.sensor_pose(FRONT)
    # Extrinsics are camera -> rig: the optical axis (camera z) points forward and ~10 deg down.
    axis = to_rig.rotation.apply([0.0, 0.0, 1.0])
    assert axis[0] > 0.98 and math.degrees(math.asin(-axis[2])) == pytest.approx(10.0, abs=0.6)
    on_axis = to_rig.apply([0.0, 0.0, 20.0])
    cam = to_rig.inv().apply(on_axis + [0.0, 1e-9, 0.0])
    np.testing.assert_allclose(model.ray2pixel(cam), model.principal_point, atol=1e-6)
    (frame,), _ = source.camera(straight.clip_id, FRONT).decode_images_from_timestamps(np.array([5_100_000]))
    rig_points = np.array(
        [[10.0, -1.75, 0.0], [10.0, 1.75, 0.0], [10.0, 5.25, 0.0], [10.0, 0.0, 0.0], [60.0, 0.0, 8.0]]
    )
    pixels = model.ray2pixel(to_rig.inv().apply(rig_points))
    assert not model.is_out_of_bounds(pixels).any()
    colours = [tuple(frame[int(v), int(u)]) for u, v in pixels]
    assert colours == [(240, 240, 240), (240, 240, 240), (230, 200, 60), (70, 70, 75), (150, 190, 235)]


def _clip_copy(src_root: Path, root: Path, new_id: str, mutate=None) -> None:
    clip = plan_clips(3, seed=0)[0].clip_id
    shutil.copytree(src_root / clip, root / new_id)
    if mutate is not None:
        mutate(root / new_id)


def test_bad_clips_get_the_same_reasons(clips_mp4, tmp_path, caplog):
    root = tmp_path / "bad"
    root.mkdir()
    wide = FRONT

    def no_columns(folder: Path) -> None:
        pd.read_parquet(folder / "egomotion.parquet").drop(columns=["qw"]).to_parquet(
            folder / "egomotion.parquet"
        )

    def bad_frames(folder: Path) -> None:
        (folder / f"{wide}.mp4").unlink()
        (folder / wide).mkdir()
        (folder / wide / "frame1.png").write_bytes(b"x")

    def short(folder: Path) -> None:
        table = pd.read_parquet(folder / "egomotion.parquet")
        table[table["timestamp_us"] <= 6_000_000].to_parquet(folder / "egomotion.parquet")

    def nan_poses(folder: Path) -> None:
        table = pd.read_parquet(folder / "egomotion.parquet")
        table.loc[100:103, ["x", "y"]] = np.nan
        table.to_parquet(folder / "egomotion.parquet")

    cases = {
        "no-ego": ("missing egomotion", lambda f: (f / "egomotion.parquet").unlink()),
        "ego-columns": ("bad egomotion", no_columns),
        "short": ("too short", short),
        "no-timestamps": (f"missing {wide}", lambda f: (f / f"{wide}.timestamps.parquet").unlink()),
        "no-camera": (f"missing {wide}", lambda f: (f / f"{wide}.mp4").unlink()),
        "garbage-video": (f"unreadable video {wide}", lambda f: (f / f"{wide}.mp4").write_bytes(b"\0" * 999)),
        "frame-names": (f"unreadable video {wide}", bad_frames),
        "nan-poses": ("bad egomotion", nan_poses),
        "bad-calibration": (None, lambda f: (f / "calibration.json").write_text('{"cameras": {}}')),
    }
    for name, (_, mutate) in cases.items():
        _clip_copy(clips_mp4, root, name, mutate)
    cf.write_manifest(root, [*cases, "no-folder"])
    source = open_source(root)
    specs, failures = plan_samples(source, TINY, source.clip_ids(), "default", ["default"])
    reasons = {clip: reason for clip, reason in failures}
    for spec in specs:
        try:
            load_sample(source, spec, TINY)
        except BadClip as exc:
            reasons[spec.clip_id] = str(exc)
    expected = {name: prefix for name, (prefix, _) in cases.items() if prefix} | {
        "no-folder": "missing egomotion"
    }
    assert {k: v.split(":")[0] for k, v in reasons.items()} == expected
    # A broken calibration.json never fails the clip: it is ignored with a warning naming the file.
    with caplog.at_level(logging.WARNING):
        assert source.calibration("bad-calibration") is None
    assert "bad-calibration/calibration.json" in caplog.text
    assert source.calibration("no-folder") is None


def test_malformed_roots_are_user_errors(clips_mp4, tmp_path):
    def manifest(content: object) -> Path:
        root = tmp_path / f"root{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        (root / "clips.json").write_text(content if isinstance(content, str) else json.dumps(content))
        return root

    good = {"format": cf.FORMAT, "version": 1}
    errors = {
        manifest("{not json"): "not valid JSON",
        manifest({"format": "other", "version": 1}): "not an own-clips manifest",
        manifest({**good, "version": 2}): "version 2 is unknown",
        manifest({**good, "clips": []}): "non-empty list",
        manifest({**good, "clips": ["a", "a"]}): "twice",
        manifest(good): "lists no clips",
    }
    for bad in ("../up", "a b", ".hidden", "x" * 129, "", "a..b", 7):
        errors[manifest({**good, "clips": [bad]})] = "not a safe name"
    unmarked = tmp_path / "unmarked"
    _clip_copy(clips_mp4, unmarked, "clip-1")
    errors[unmarked] = "looks like an own-clips folder but has no clips.json"
    for root, message in errors.items():
        with pytest.raises(UserError, match=message) as info:
            open_source(root)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="dev kit cannot read it"):
        open_source(clips_mp4, reader="devkit")
    # Without a "clips" list the clip folders are discovered (sorted; hidden folders skipped).
    (unmarked / ".trash").mkdir()
    (unmarked / "clips.json").write_text(json.dumps(good))
    assert open_source(unmarked).clip_ids() == ["clip-1"]


def test_calibration_json_forms(tmp_path):
    # Pinhole 1920x1080 with 90 deg horizontal FOV, as the closest f-theta polynomials.
    focal = 960.0
    row, err = cf.pinhole_row(1920, 1080, 960.0, 540.0, focal)
    assert 0.6 < err < 0.75
    path = tmp_path / "calibration.json"
    extrinsics = {"qx": -0.5, "qy": 0.5, "qz": -0.5, "qw": 0.5, "x": 1.7, "y": 0.0, "z": 1.5}
    intr = {
        "model": "pinhole",
        "width": 1920,
        "height": 1080,
        "cx": 960.0,
        "cy": 540.0,
        "fx": focal,
        "fy": focal,
    }
    path.write_text(json.dumps({"cameras": {FRONT: {"intrinsics": intr, "extrinsics": extrinsics}}}))
    calibration = cf.read_calibration_json(path)
    assert calibration.intrinsics[FRONT] == row and calibration.extrinsics[FRONT] == extrinsics
    doubled = {**extrinsics, "qx": -1.0, "qy": 1.0, "qz": -1.0, "qw": 1.0}  # not unit: normalised on reading
    path.write_text(json.dumps({"cameras": {FRONT: {"intrinsics": intr, "extrinsics": doubled}}}))
    assert cf.read_calibration_json(path).extrinsics[FRONT] == extrinsics
    model = calibration.camera_model(FRONT)
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.uniform(0, 1920, 500), rng.uniform(0, 1080, 500)], axis=1)
    rays = np.concatenate(
        [(pixels - [960.0, 540.0]) / focal, np.ones((500, 1))], axis=1
    )  # exact pinhole rays
    assert np.abs(model.ray2pixel(rays) - pixels).max() < err + 1e-9
    # The rig point 10 m ahead at the camera's height lands on the principal point (camera -> rig pose).
    ahead = calibration.sensor_pose(FRONT).inv().apply([[11.7, 1e-9, 1.5]])
    np.testing.assert_allclose(model.ray2pixel(ahead)[0], [960.0, 540.0], atol=1e-5)
    # f-theta without bw_poly: fitted as the inverse of fw_poly.
    fw = {f"fw_poly_{i}": c for i, c in enumerate([0.0, 1000.0, 0.0, -40.0, 0.0])}  # ~120 deg wide
    intr = {"width": 1920, "height": 1080, "cx": 960.0, "cy": 540.0, **fw}
    path.write_text(json.dumps({"cameras": {FRONT: {"intrinsics": intr, "extrinsics": extrinsics}}}))
    model = cf.read_calibration_json(path).camera_model(FRONT)
    theta = np.linspace(0.0, 1.1, 50)  # up to the image corner
    np.testing.assert_allclose(model.r2th(model.th2r(theta)), theta, atol=2e-4)
    for broken, message in (
        ({k: v for k, v in intr.items() if k != "fw_poly_3"}, "'fw_poly_3' must be a finite number"),
        ({**intr, "model": "pinhole", "fx": 900.0, "fy": 1000.0}, "differ by over 1%"),
        ({**intr, "model": "kannala"}, "unknown"),
        ({**intr, "bw_poly_0": 0.0}, "all of bw_poly_0..4 or none"),
    ):
        path.write_text(json.dumps({"cameras": {FRONT: {"intrinsics": broken, "extrinsics": extrinsics}}}))
        with pytest.raises(UserError, match=message):
            cf.read_calibration_json(path)


def test_hub_cache_calibration_is_read_equally_by_devkit_and_folder(synthetic_data):
    devkit, folder = open_source(synthetic_data), open_source(synthetic_data, reader="folder")
    assert isinstance(devkit, DevKitSource) and isinstance(folder, FolderSource)
    features = folder.features
    assert features.at["camera_intrinsics", "chunk_path"] == (
        "calibration/camera_intrinsics/camera_intrinsics.chunk_{chunk_id:04d}.parquet"
    )
    assert features.at["sensor_extrinsics", "directory"] == "calibration"
    table = pd.read_parquet(
        folder.root / "calibration/camera_intrinsics/camera_intrinsics.chunk_0000.parquet"
    )
    assert table.index.names == ["clip_id", "camera_name"] and table["width"].dtype == np.int64
    extr = pd.read_parquet(folder.root / "calibration/sensor_extrinsics/sensor_extrinsics.chunk_0000.parquet")
    assert extr.index.names == ["clip_id", "sensor_name"] and list(extr.columns) == list(
        cf.EXTRINSICS_COLUMNS
    )
    raw = devkit.api.get_clip_feature(devkit.clip_ids()[0], "camera_intrinsics")
    assert type(raw.camera_models[FRONT]).__name__ == "FThetaCameraModel"
    for clip in devkit.clip_ids():
        a, b = devkit.calibration(clip), folder.calibration(clip)
        assert a == b and a.cameras == TINY_CAMERAS
        written = clip_calibration(clip, TINY_CAMERAS, SIZE)
        for cam in TINY_CAMERAS:
            assert a.intrinsics[cam] == written.intrinsics[cam]
            np.testing.assert_allclose(
                list(a.extrinsics[cam].values()), list(written.extrinsics[cam].values())
            )
    folder.features = features.drop(index=["camera_intrinsics"])  # a dataset without calibration
    assert folder.calibration(folder.clip_ids()[0]) is None


def test_calibration_not_downloaded_is_none(synthetic_data, tmp_path):
    copy = tmp_path / "hub"
    shutil.copytree(synthetic_data, copy)
    devkit = open_source(copy)
    chunks = devkit.api.clip_index["chunk"]
    snapshot = next((copy / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles" / "snapshots").iterdir())
    (snapshot / "calibration/sensor_extrinsics/sensor_extrinsics.chunk_0001.parquet").unlink()
    for source in (devkit, open_source(copy, reader="folder")):
        assert source.calibration(chunks.index[chunks == 0][0]) is not None
        assert source.calibration(chunks.index[chunks == 1][0]) is None


def test_own_clips_precompute_train_eval(clips_mp4, tmp_path):
    from alpamayo_cache.evaluate import EvalConfig
    from alpamayo_cache.evaluate import run as evaluate
    from alpamayo_cache.precompute import run as precompute
    from alpamayo_cache.train import TrainConfig
    from alpamayo_cache.train import run as train

    store = tmp_path / "store"
    result = precompute(precompute_cfg(clips_mp4, store, keyframes="stride:2", val_percent=50))
    source = open_source(clips_mp4)
    expected = sum(len(keyframes("stride:2", source.egomotion(c), TINY)) for c in source.clip_ids())
    assert expected >= 6 and result.planned == result.written == expected and not result.failed
    run_dir = tmp_path / "run"
    train(TrainConfig(store=store, run_dir=run_dir, steps=2, device="cpu", val_split=""))
    metrics = evaluate(
        EvalConfig(
            store=store, checkpoints=(str(run_dir),), split="all", device="cpu", plots=False, num_samples=2
        )
    )
    assert set(metrics["models"]) >= {"baseline"} and len(metrics["models"]) == 2


def test_converter_example_on_a_synthetic_dump(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_clip_folder", Path(__file__).parents[1] / "examples/make_clip_folder.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--demo", str(tmp_path)])
    original, converted = open_source(tmp_path / "synthetic"), open_source(tmp_path / "clips")
    (clip,) = original.clip_ids()
    assert converted.clip_ids() == ["sim-run-001"]
    ts = np.arange(0, 12_000_001, 250_000)
    a, b = original.egomotion(clip)(ts).pose, converted.egomotion("sim-run-001")(ts).pose
    np.testing.assert_allclose(b.translation, a.translation, atol=1e-9)  # seconds and yaw in degrees, back
    np.testing.assert_allclose((a.rotation.inv() * b.rotation).magnitude(), 0, atol=1e-9)
    at = np.array([3_050_000, 7_000_000])
    fa, ta = original.camera(clip, FRONT).decode_images_from_timestamps(at)
    fb, tb = converted.camera("sim-run-001", FRONT).decode_images_from_timestamps(at)
    np.testing.assert_array_equal(tb, ta)
    np.testing.assert_array_equal(fb, fa)
    assert converted.calibration("sim-run-001") == original.calibration(clip)


def test_synthetic_videos_are_byte_identical_run_to_run():
    from alpamayo_cache.data.synthetic_render import encode_video

    plan = plan_clips(1, seed=0)[0]
    frames = render_camera(
        lane_points(drive(plan), 121),
        "camera_front_tele_30fov",
        clip_calibration(plan.clip_id, TINY_CAMERAS, SIZE),
        121,
    )
    assert len({encode_video(frames) for _ in range(4)}) == 1  # x264's mbtree made ~1 in 4 differ
