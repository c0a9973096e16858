"""Shared fixtures: the reference fixture folder and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    env = os.environ.get("ALPAMAYO_CACHE_REFERENCE_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    folder = reference_dir()
    if not folder.is_dir():
        pytest.fail(f"reference fixtures not found at {folder}; set ALPAMAYO_CACHE_REFERENCE_FIXTURES")
    return folder


TINY_CAMERAS = (
    "camera_cross_left_120fov",
    "camera_front_wide_120fov",
    "camera_cross_right_120fov",
    "camera_front_tele_30fov",
)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Nine clean synthetic clips (the tiny preset's two cameras), as a hub cache."""
    from alpamayo_cache.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data")
    write_dataset(root, n_clips=9, seed=0, cameras=TINY_CAMERAS)
    return root


@pytest.fixture(scope="session")
def faulty_data(tmp_path_factory) -> Path:
    """Six clips, four of them broken in the four ways precompute must survive."""
    from alpamayo_cache.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("faulty")
    faults = {"missing_camera": "1", "corrupt_video": "2", "short": "3", "nan_egomotion": "4"}
    write_dataset(root, n_clips=6, seed=1, cameras=TINY_CAMERAS, faults=faults)
    return root


def precompute_cfg(data: Path, store: Path, **kw):
    from alpamayo_cache.precompute import PrecomputeConfig

    kw.setdefault("val_percent", 34)
    kw.setdefault("model", "tiny")
    return PrecomputeConfig(store=store, data=str(data), device="cpu", **kw)


@pytest.fixture(scope="session")
def tiny_store(synthetic_data, tmp_path_factory) -> Path:
    """A committed tiny-preset store: 9 clips x 3 keyframes (stride 1.5 s), fp32 K/V."""
    from alpamayo_cache.precompute import run

    store = tmp_path_factory.mktemp("stores") / "tiny"
    run(precompute_cfg(synthetic_data, store, keyframes="stride:1.5"))
    return store


# Counters the reliability tests fill in; printed as one line at the end of the session.
RELIABILITY = {"kills survived": 0, "samples lost": 0, "bad inputs rejected": 0}


def pytest_terminal_summary(terminalreporter) -> None:
    if any(RELIABILITY.values()):
        parts = ", ".join(f"{v} {k}" for k, v in RELIABILITY.items())
        terminalreporter.write_line(f"reliability: {parts}")
