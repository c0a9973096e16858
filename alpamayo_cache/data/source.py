"""Reading PhysicalAI-AV clips from a local folder, in either of the two layouts users have.

- **Hub cache** (what ``huggingface_hub`` and the dev kit download into):
  ``<cache>/datasets--nvidia--PhysicalAI-Autonomous-Vehicles/snapshots/<revision>/...``.
  Read through the dev kit itself (``physical_ai_av.PhysicalAIAVDatasetInterface``) in offline mode.
- **Plain folder** (what the release's download script writes with ``--output-dir``): the same files
  (``features.csv``, ``clip_index.parquet``, per-chunk zips) without the cache wrapping. The dev kit
  never looks in a plain folder offline, so we resolve files ourselves and hand the bytes to the dev
  kit's own decoders (egomotion interpolator, seekable video reader). Only file lookup differs.

Both expose the same small interface, ``ClipSource``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from alpamayo_cache.errors import UserError

REPO_ID = "nvidia/PhysicalAI-Autonomous-Vehicles"
CACHE_REPO_DIR = "datasets--nvidia--PhysicalAI-Autonomous-Vehicles"
EGOMOTION = "egomotion"


class BadClip(Exception):
    """A clip that cannot make a sample; the message is the reason recorded in the failures list."""


class ClipSource(Protocol):
    description: str

    def clip_ids(self) -> list[str]: ...

    def egomotion(self, clip_id: str) -> Any:
        """Interpolator: timestamps [n] (us since clip start) -> state with .pose (scipy RigidTransform)."""

    def camera(self, clip_id: str, camera: str) -> Any:
        """Video reader with ``decode_images_from_timestamps(ts) -> (uint8 [n, H, W, 3], ts)``."""


def _decode_egomotion(data: bytes) -> Any:
    from physical_ai_av import egomotion

    df = pd.read_parquet(io.BytesIO(data))
    return egomotion.EgomotionState.from_egomotion_df(df).create_interpolator(
        df["timestamp"].to_numpy(copy=True)
    )


def _decode_camera(video: bytes, timestamps: bytes) -> Any:
    from physical_ai_av import video as video_mod

    ts = pd.read_parquet(io.BytesIO(timestamps))["timestamp"].to_numpy(copy=True)
    return video_mod.SeekVideoReader(video_data=io.BytesIO(video), timestamps=ts)


class FolderSource:
    """The dataset's files in a plain folder (no hub cache), decoded with the dev kit's decoders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"folder {self.root}"
        features = pd.read_csv(self.root / "features.csv", index_col="feature")
        self.features = features
        self.clip_index = pd.read_parquet(self.root / "clip_index.parquet")

    def clip_ids(self) -> list[str]:
        return [str(c) for c in self.clip_index.index]

    def _members(self, clip_id: str, feature: str) -> dict[str, bytes]:
        if clip_id not in self.clip_index.index:
            raise BadClip(f"clip {clip_id} is not in clip_index.parquet")
        if feature not in self.features.index:
            raise BadClip(f"feature {feature} is not in features.csv")
        row = self.features.loc[feature]
        chunk = int(self.clip_index.at[clip_id, "chunk"])
        path = self.root / str(row["chunk_path"]).format(chunk_id=chunk)
        if not path.is_file():
            raise BadClip(f"missing {feature}: file {path.name} is not in the dataset folder")
        templates = json.loads(row["clip_files_in_zip"])
        out = {}
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for alias, template in templates.items():
                member = template.format(clip_id=clip_id)
                if member not in names:
                    raise BadClip(f"missing {feature}: {member} is not in {path.name}")
                out[alias] = zf.read(member)
        return out

    def egomotion(self, clip_id: str) -> Any:
        return _decode_egomotion(self._members(clip_id, EGOMOTION)["egomotion"])

    def camera(self, clip_id: str, camera: str) -> Any:
        members = self._members(clip_id, camera)
        return _decode_camera(members["video"], members["frame_timestamps"])


class DevKitSource:
    """The dev kit reading a hub-cache folder offline at a fixed revision."""

    def __init__(self, cache_dir: Path, revision: str) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network from here
        import huggingface_hub.constants
        from physical_ai_av import PhysicalAIAVDatasetInterface

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        self.description = f"dev kit, hub cache {cache_dir} @ {revision[:12]}"
        self.api = PhysicalAIAVDatasetInterface(revision=revision, cache_dir=str(cache_dir))

    def clip_ids(self) -> list[str]:
        return [str(c) for c in self.api.clip_index.index]

    def _check(self, clip_id: str, feature: str) -> None:
        presence = self.api.feature_presence
        if (
            feature in presence.columns
            and clip_id in presence.index
            and not bool(presence.at[clip_id, feature])
        ):
            raise BadClip(f"missing {feature}: not present for this clip (feature_presence)")

    def egomotion(self, clip_id: str) -> Any:
        self._check(clip_id, EGOMOTION)
        return self._get(clip_id, EGOMOTION)

    def camera(self, clip_id: str, camera: str) -> Any:
        self._check(clip_id, camera)
        return self._get(clip_id, camera)

    def _get(self, clip_id: str, feature: str) -> Any:
        try:
            return self.api.get_clip_feature(clip_id, feature)
        except (KeyError, FileNotFoundError) as exc:
            raise BadClip(f"missing {feature}: {exc}") from exc


def find_snapshot(path: Path) -> tuple[Path, str] | None:
    """If ``path`` is a hub cache (or inside one), return (cache_dir, revision)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if candidate.name == CACHE_REPO_DIR:
            snapshots = sorted(p.name for p in (candidate / "snapshots").glob("*") if p.is_dir())
            inside = path.relative_to(candidate).parts
            if len(inside) >= 2 and inside[0] == "snapshots":
                return candidate.parent, inside[1]
            ref = candidate / "refs" / "main"
            if ref.is_file():
                return candidate.parent, ref.read_text().strip()
            if len(snapshots) == 1:
                return candidate.parent, snapshots[0]
            raise UserError(f"{candidate} holds several snapshots and no refs/main: pass --revision")
    if (path / CACHE_REPO_DIR).is_dir():
        return find_snapshot(path / CACHE_REPO_DIR)
    return None


def open_source(path: Path, revision: str | None = None, reader: str = "auto") -> ClipSource:
    """Open a local dataset folder. ``reader``: auto | devkit | folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"dataset folder {path} does not exist: download PhysicalAI-AV there or run `alpamayo-cache synth`"
        )
    snapshot = find_snapshot(path)
    if snapshot is not None:
        cache_dir, found_revision = snapshot
        revision = revision or found_revision
        if reader == "folder":
            return FolderSource(cache_dir / CACHE_REPO_DIR / "snapshots" / revision)
        return DevKitSource(cache_dir, revision)
    if not (path / "features.csv").is_file() or not (path / "clip_index.parquet").is_file():
        raise UserError(
            f"{path} has no features.csv/clip_index.parquet: not a PhysicalAI-AV folder or hub cache"
        )
    if reader == "devkit":
        raise UserError(
            f"{path} is a plain folder; the dev kit reads only a hub cache offline (use --reader folder)"
        )
    return FolderSource(path)
