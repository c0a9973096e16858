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
