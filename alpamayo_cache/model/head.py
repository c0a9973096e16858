"""Build a policy from a model spec: a preset (random weights from a fixed seed), a released Alpamayo
folder (head keys only), or a training-run checkpoint (config read from the checkpoint). Head files
use the release's key names (``expert.``-prefixed for 2 Super), mapped to module names on load."""

from __future__ import annotations

from pathlib import Path

import torch

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.policy import Policy
from alpamayo_cache.model.weights import (
    from_release_keys,
    load_head_file,
    load_into,
    load_released,
    read_metadata,
)


def init_head(cfg: ModelConfig, attention: str | None = None) -> Policy:
    """Random policy with weights fixed by ``cfg.init_seed`` (independent of the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed + 1)  # +1: the VLM of the same preset uses init_seed
        return Policy(cfg, attention=attention)


def head_file_config(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object], ModelConfig]:
    """A run checkpoint's head file: tensors, metadata and the model config it records."""
    tensors, meta = load_head_file(path)
    if "model_config" not in meta:
        raise UserError(f"{path} carries no model_config metadata: not an alpamayo-cache checkpoint")
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])  # type: ignore[arg-type]
    except UserError as exc:
        raise UserError(f"{path}: its model_config is not readable ({exc})") from None
    return tensors, meta, cfg


def head_config(spec: str) -> tuple[ModelConfig, str]:
    """The model config of a spec and its description, without reading any weight tensor."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "model_config" not in meta:
            raise UserError(f"{path} carries no model_config metadata: not an alpamayo-cache checkpoint")
        return ModelConfig.from_dict(meta["model_config"]), f"checkpoint {path}"  # type: ignore[arg-type]
    cfg = resolve_model(spec)
    return cfg, (f"released weights {path}" if path.is_dir() else f"preset {cfg.name} (seed {cfg.init_seed})")


def load_head(spec: str, attention: str | None = None) -> tuple[Policy, ModelConfig, str]:
    """-> (policy, config, description). ``spec`` is a preset, a released folder or a run checkpoint."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".safetensors":
        tensors, meta, cfg = head_file_config(path)
        # A run saves only the groups it trained; the rest come from the run's starting weights.
        head = init_head(cfg, attention)
        base = str(meta.get("base", cfg.name))
        if Path(base).is_dir():
            load_released(head, Path(base))
        load_into(head, from_release_keys(tensors, cfg.head_key_prefix), str(path), partial=True)
        return head, cfg, f"checkpoint {path}"
    cfg = resolve_model(spec)
    head = init_head(cfg, attention)
    if path.is_dir():
        load_released(head, path)
        return head, cfg, f"released weights {path}"
    return head, cfg, f"preset {cfg.name} (seed {cfg.init_seed})"
