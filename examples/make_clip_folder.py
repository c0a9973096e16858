"""Convert a simulator-style dump (a CSV of poses + a folder of frames per camera) into an own-clips folder.

The dump this example reads (adapt the column names with the flags)::

    <dump>/poses.csv            time, x, y, z (m, world frame, z up) and yaw [, pitch, roll] or qx, qy, qz, qw
    <dump>/<camera>/<n>.png     frames per camera (PhysicalAI-AV camera names), <n> = time or frame index
    <dump>/calibration.json     optional, already in the format of docs/CLIPS.md

It writes ``<out>/<clip_id>/`` (egomotion.parquet, one frame folder per camera, calibration.json) and
adds the clip to ``<out>/clips.json``. Try it on a dump made from the synthetic clips::

    python examples/make_clip_folder.py --demo /tmp/demo        # writes /tmp/demo/dump and /tmp/demo/clips
    python examples/make_clip_folder.py /tmp/demo/dump --out /tmp/clips --clip-id run-001 \\
        --time-column time_s --time-unit s --angles deg --frame-names index --fps 10
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from alpamayo_cache.config import ALL_CAMERAS
from alpamayo_cache.data import clip_folder as cf

US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}


def convert_poses(poses: pd.DataFrame, time_column: str, unit: str, angles: str) -> tuple[pd.DataFrame, int]:
    """The egomotion table (timestamp_us from the first pose, rig -> world quaternion) and that first time."""
    t_us = np.round(poses[time_column].to_numpy(dtype=np.float64) * US_PER[unit]).astype(np.int64)
    if {"qx", "qy", "qz", "qw"} <= set(poses.columns):
        quat = poses[["qx", "qy", "qz", "qw"]].to_numpy(dtype=np.float64)
    else:  # yaw (left-positive about z up), pitch (nose down positive), roll: intrinsic z-y'-x''
        ypr = np.stack([poses.get(c, pd.Series(0.0, index=poses.index)) for c in ("yaw", "pitch", "roll")], 1)
        quat = Rotation.from_euler("ZYX", ypr, degrees=angles == "deg").as_quat()
    table = pd.DataFrame({"timestamp_us": t_us - t_us[0]})  # the clip's clock starts at its first pose
    table[["x", "y", "z"]] = poses[["x", "y", "z"]].to_numpy(dtype=np.float64)
    table[["qx", "qy", "qz", "qw"]] = quat
    return table, int(t_us[0])


def copy_frames(src: Path, dst: Path, names: str, unit: str, fps: float, start_us: int) -> int:
    """Copy ``src/<n>.<ext>`` to ``dst/<timestamp_us>.<ext>`` on the egomotion clock; returns the count."""
    dst.mkdir(parents=True, exist_ok=True)
    frames = sorted(
        (f for f in src.iterdir() if f.suffix.lower() in cf.IMAGE_SUFFIXES), key=lambda f: float(f.stem)
    )
    for f in frames:
        if names == "index":  # frame k was taken k / fps seconds after the first pose
            stamp = round(int(f.stem) * 1_000_000 / fps)
        else:
            stamp = round(float(f.stem) * US_PER[unit]) - start_us
        shutil.copyfile(f, dst / f"{stamp}{f.suffix.lower()}")
    return len(frames)


def convert(dump: Path, out: Path, clip_id: str, args: argparse.Namespace) -> Path:
    cf.check_clip_id(clip_id, out / cf.MANIFEST)
    folder = out / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    ego, start_us = convert_poses(
        pd.read_csv(dump / "poses.csv"), args.time_column, args.time_unit, args.angles
    )
    ego.to_parquet(folder / "egomotion.parquet", index=False)
    for cam in ALL_CAMERAS:
        if (dump / cam).is_dir():
            n = copy_frames(dump / cam, folder / cam, args.frame_names, args.time_unit, args.fps, start_us)
            print(f"{clip_id}: {cam}: {n} frames")
    if (dump / cf.CALIBRATION_FILE).is_file():
        cf.read_calibration_json(dump / cf.CALIBRATION_FILE)  # refuse a malformed file here, not later
        shutil.copyfile(dump / cf.CALIBRATION_FILE, folder / cf.CALIBRATION_FILE)
    known = cf.read_manifest(out) if (out / cf.MANIFEST).is_file() else []
    cf.write_manifest(out, [*[c for c in known if c != clip_id], clip_id])
    return folder


def check(out: Path, clip_id: str) -> None:
    """Read the clip back the way precompute will."""
    from alpamayo_cache.data.source import open_source

    source = open_source(out)
    ego = source.egomotion(clip_id)
    mid = int(ego.timestamps[len(ego.timestamps) // 2])
    for cam in ALL_CAMERAS:
        if (out / clip_id / cam).is_dir():
            frames, stamps = source.camera(clip_id, cam).decode_images_from_timestamps(np.array([mid]))
            print(
                f"{clip_id}: {cam} at {mid} us -> frame {stamps[0]} us, {frames.shape[1]}x{frames.shape[2]}"
            )
    print(f"{clip_id}: calibrated cameras: {list(getattr(source.calibration(clip_id), 'cameras', []))}")


def make_demo_dump(root: Path) -> Path:
    """A dump as a simulator might write it, made from one synthetic clip: seconds, yaw in degrees,
    frames numbered by index."""
    from alpamayo_cache.data.synthetic import write_clip_folder

    synthetic = write_clip_folder(
        root / "synthetic", n_clips=1, seed=0, image_format="png", table_format="csv"
    )
    (clip,) = cf.read_manifest(synthetic)
    ego = pd.read_csv(synthetic / clip / "egomotion.csv")
    yaw = Rotation.from_quat(ego[["qx", "qy", "qz", "qw"]].to_numpy()).as_euler("ZYX", degrees=True)[:, 0]
    dump = root / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    poses = pd.DataFrame({"time_s": ego["timestamp_us"] / 1e6, "x": ego["x"], "y": ego["y"], "z": ego["z"]})
    poses.assign(yaw=yaw).to_csv(dump / "poses.csv", index=False, float_format="%.17g")
    for cam in ALL_CAMERAS:
        (dump / cam).mkdir(exist_ok=True)
        for k, frame in enumerate(sorted((synthetic / clip / cam).iterdir(), key=lambda f: int(f.stem))):
            shutil.copyfile(frame, dump / cam / f"{k:06d}.png")
    shutil.copyfile(synthetic / clip / cf.CALIBRATION_FILE, dump / cf.CALIBRATION_FILE)
    return dump


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dump", type=Path, nargs="?", help="folder with poses.csv and <camera>/ frame folders"
    )
    parser.add_argument("--out", type=Path, help="own-clips root to write into (created or extended)")
    parser.add_argument("--clip-id", help="id of the new clip (its folder name)")
    parser.add_argument("--time-column", default="time_s", help="time column of poses.csv")
    parser.add_argument(
        "--time-unit", default="s", choices=sorted(US_PER), help="unit of times and time-named frames"
    )
    parser.add_argument(
        "--angles", default="deg", choices=("deg", "rad"), help="unit of yaw/pitch/roll columns"
    )
    parser.add_argument(
        "--frame-names", default="time", choices=("time", "index"), help="what frame names count"
    )
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate for --frame-names index")
    parser.add_argument("--demo", type=Path, help="make a dump from synthetic clips here and convert it")
    args = parser.parse_args(argv)
    if args.demo is not None:
        args.dump, args.out, args.clip_id = make_demo_dump(args.demo), args.demo / "clips", "sim-run-001"
        args.time_column, args.time_unit, args.angles, args.frame_names = "time_s", "s", "deg", "index"
    if args.dump is None or args.out is None or args.clip_id is None:
        parser.error("give DUMP, --out and --clip-id (or --demo DIR)")
    convert(args.dump, args.out, args.clip_id, args)
    check(args.out, args.clip_id)
    print(f"wrote {args.out / args.clip_id}; use it with --data {args.out}")


if __name__ == "__main__":
    main()
