"""Load and save the trajectory head's weights (``expert.*``, ``action_in_proj.*``, ``action_out_proj.*``).

A released Alpamayo-R1 folder holds ~22 GB of sharded safetensors; the VLM is 17.6 GB of it. We read
the index, open only the shards that hold head keys, and read only those tensors, so training and
evaluation never touch the VLM's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alpamayo_cache.errors import UserError

HEAD_PREFIXES = ("expert.", "action_in_proj.", "action_out_proj.")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def head_key_locations(folder: Path) -> dict[str, Path]:
    """Map each head key to the shard that holds it (no tensor is read)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} has no config.json: it is not an Alpamayo-R1 checkpoint folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "alpamayo_r1":
        raise UserError(f"{folder}/config.json has model_type {model_type!r}, expected 'alpamayo_r1'")
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        locations = {k: folder / shard for k, shard in weight_map.items() if is_head_key(k)}
    elif (folder / SINGLE_NAME).is_file():
        with safe_open(folder / SINGLE_NAME, "pt") as f:
            locations = {k: folder / SINGLE_NAME for k in f.keys() if is_head_key(k)}
    else:
        raise UserError(f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}: not a safetensors checkpoint")
    if not locations:
        raise UserError(f"{folder} holds no expert.*/action_in_proj.*/action_out_proj.* weights")
    return locations


def read_head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Read only the head tensors of a released checkpoint folder."""
    locations = head_key_locations(folder)
    by_shard: dict[Path, list[str]] = {}
    for key, shard in locations.items():
        by_shard.setdefault(shard, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        if not shard.is_file():
            raise UserError(f"shard {shard.name} listed in {INDEX_NAME} is missing from {folder}")
        with safe_open(shard, "pt") as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
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


def save_head(
    path: Path, module: torch.nn.Module, only_groups: tuple[str, ...] | None = None, meta: dict | None = None
) -> None:
    """Save head tensors (optionally only some top-level groups) under the released key names."""
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in module.state_dict().items()
        if is_head_key(k) and (only_groups is None or k.split(".")[0] in only_groups)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    tmp.replace(path)


def load_head_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    if not Path(path).is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta
