"""Reading and writing safetensors weights: one reader for sharded release folders (VLM and head alike),
the head's load/save under the released key names.

A released Alpamayo-R1 folder holds ~22 GB of sharded safetensors; the VLM is 17.6 GB of it. We read
the index, open only the shards that hold the wanted keys, and read only those tensors, so training
and evaluation never touch the VLM's bytes.
"""

from __future__ import annotations

import json
import os
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
MODEL_TYPES = ("alpamayo_r1", "alpamayo1_5", "alpamayo2_super")
# Buffers 1.5 and 2 Super rebuild from config.json (non-persistent in 1.5, ignored-when-missing in
# 2 Super): a checkpoint copy is never required and never used when the model says buffers_from_config.
REBUILT_SUFFIX = ".freqs"
# 2 Super also keeps the action normalisation stats as (ignored) buffers: expert.action_space.*.
CONFIG_ONLY_GROUPS = ("action_space.",)


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


def from_release_keys(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint names -> module names: strip the release's head prefix (2 Super: ``expert.``), drop
    the config-only buffers (``action_space.*``: the stats come from config.json)."""
    out = {}
    for key, value in tensors.items():
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not name.startswith(CONFIG_ONLY_GROUPS):
            out[name] = value
    return out


def to_release_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Module names -> the release's checkpoint names (2 Super: ``expert.expert.*``, ``expert.action_*``)."""
    return {prefix + key: value for key, value in state.items()}


def read_head_tensors(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The head's tensors of a release folder, under module names."""
    tensors = from_release_keys(read_tensors(folder, is_head_key), prefix)
    if not tensors:
        raise UserError(f"{folder} holds no expert.*/action_in_proj.*/action_out_proj.* weights")
    return tensors


def load_into(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, partial: bool = False
) -> None:
    """Copy ``tensors`` into ``module`` checking names and shapes; every head key must be present
    unless ``partial`` (a run that trained only some groups saves only those). A model whose buffers
    come from config (1.5, 2 Super) neither needs nor takes the checkpoint's Fourier frequencies."""
    expected = {k: v for k, v in module.state_dict().items() if is_head_key(k)}
    cfg = getattr(module, "cfg", None)
    if cfg is not None and cfg.buffers_from_config:
        expected = {k: v for k, v in expected.items() if not k.endswith(REBUILT_SUFFIX)}
        tensors = {k: v for k, v in tensors.items() if not k.endswith(REBUILT_SUFFIX)}
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
    cfg = getattr(module, "cfg", None)
    load_into(module, read_head_tensors(folder, cfg.head_key_prefix if cfg else ""), str(folder))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' writer, with the permissions any other file gets (it creates files 0600, which
    would hide a checkpoint or an export from the other users of a shared disk)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write a safetensors file atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        write_safetensors(tmp, state, {k: json.dumps(v) for k, v in (meta or {}).items()})
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
