"""Reading and writing safetensors weights: one reader for sharded release folders (VLM and head alike),
the head's load/save under the released key names.

A released Alpamayo-R1 folder holds ~22 GB of sharded safetensors; the VLM is 17.6 GB of it. We read
the index, open only the shards that hold the wanted keys, and read only those tensors, so training
and evaluation never touch the VLM's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from alpamayo_cache.errors import UserError
from alpamayo_cache.integrity import verify_checksum

HEAD_PREFIXES = ("expert.", "action_in_proj.", "action_out_proj.")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MODEL_TYPES = ("alpamayo_r1",)


def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def release_config(folder: Path) -> dict:
    """config.json of a release folder, refusing anything that is not one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: point at an Alpamayo checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: the checkpoint folder is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in MODEL_TYPES:
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise UserError(
            f"{path} has model_type {found!r}, not one of {MODEL_TYPES}: not an Alpamayo checkpoint"
        )
    return cfg


def tensor_locations(folder: Path, select: Callable[[str], bool]) -> dict[str, Path]:
    """Map each selected key to the shard that holds it (no tensor is read)."""
    folder = Path(folder)
    release_config(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is damaged (no readable weight_map)") from None
        return {k: folder / shard for k, shard in weight_map.items() if select(k)}
    if (folder / SINGLE_NAME).is_file():
        with _open(folder / SINGLE_NAME) as f:
            return {k: folder / SINGLE_NAME for k in f.keys() if select(k)}
    raise UserError(f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}: not a safetensors checkpoint")


def _open(path: Path):
    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{path} is not a readable safetensors file ({exc}): the checkpoint is damaged"
        ) from None


def read_tensors(folder: Path, select: Callable[[str], bool], strip: str = "") -> dict[str, torch.Tensor]:
    """The selected tensors of a release folder, reading only the shards that hold them."""
    by_shard: dict[Path, list[str]] = {}
    for key, shard in tensor_locations(folder, select).items():
        by_shard.setdefault(shard, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        if not shard.is_file():
            raise UserError(f"shard {shard.name} listed in {INDEX_NAME} is missing from {folder}")
        with _open(shard) as f:
            for key in keys:
                tensors[key[len(strip) :] if key.startswith(strip) else key] = f.get_tensor(key)
    return tensors


def read_head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = read_tensors(folder, is_head_key)
    if not tensors:
        raise UserError(f"{folder} holds no expert.*/action_in_proj.*/action_out_proj.* weights")
    return tensors


def load_into(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, partial: bool = False
) -> None:
    """Copy ``tensors`` into ``module`` checking names and shapes; every head key must be present
    unless ``partial`` (a run that trained only some groups saves only those)."""
    expected = {k: v for k, v in module.state_dict().items() if is_head_key(k)}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UserError(
            f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all): checkpoint of another architecture"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing and not partial:
        raise UserError(
            f"{source}: missing key {missing[0]!r} ({len(missing)} in all): incomplete or wrong checkpoint"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{source}: {key} has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}: "
                "checkpoint of another model size"
            )
    with torch.no_grad():
        state = module.state_dict()
        for key, value in tensors.items():
            state[key].copy_(value.to(state[key].dtype))


def load_released(module: torch.nn.Module, folder: Path) -> None:
    load_into(module, read_head_tensors(folder), str(folder))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write a safetensors file atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: Path) -> dict[str, object]:
    """The JSON metadata of a safetensors file (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    with _open(path) as f:
        try:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except json.JSONDecodeError:
            raise UserError(f"{path} has damaged metadata: not an alpamayo-cache checkpoint") from None


def load_head_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and metadata of a head file; a run checkpoint's file is checked against its checksum."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    verify_checksum(path)
    tensors: dict[str, torch.Tensor] = {}
    with _open(path) as f:
        try:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except json.JSONDecodeError:
            raise UserError(f"{path} has damaged metadata: not an alpamayo-cache checkpoint") from None
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta
