"""``alpamayo-cache export RUN --to DIR``: a training run as a complete Alpamayo-R1 checkpoint folder.

The run's checkpoint holds what it changed, already under the release's key names: ``head.safetensors``
(``expert.*``, ``action_in_proj.*``, ``action_out_proj.*``; LoRA merged) and, for ``--train vlm-top``,
``vlm_layers.safetensors`` (``vlm.model.language_model.layers.<i>.*``; LoRA merged). Everything else
comes from the run's starting weights:

- a released folder (``--base``, or the run's ``--init``): its ``config.json``, tokenizer and other
  small files are copied and its index kept as it is; every shard that holds no changed tensor is
  hard-linked (or copied), and each shard that does is rewritten with the changed tensors in the
  original dtype. Keys, shapes, dtypes and the weight map are those of the release, so the release's
  own loader reads the folder exactly as it reads the original;
- a preset (seeded random weights): the whole model is written (VLM from the preset's seed, the head,
  the changed tensors), sharded with an index, with a ``config.json`` in the release's schema.

``alpamayo_cache_export.json`` records what was done (run checkpoint, base, linked/rewritten shards).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.configs import ExportConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.integrity import folder_problems
from alpamayo_cache.model.vlm_top import VLM_LAYERS
from alpamayo_cache.model.weights import (
    INDEX_NAME,
    SINGLE_NAME,
    load_head_file,
    release_config,
    write_safetensors,
)
from alpamayo_cache.runtime import human_bytes, log
from alpamayo_cache.train.checkpoints import HEAD, latest_checkpoint

__all__ = ["ExportConfig", "run", "release_config_dict"]
PROVENANCE = "alpamayo_cache_export.json"


def checkpoint_folder(path: Path) -> Path:
    """A run folder's newest intact checkpoint, or the checkpoint folder itself; damage is refused."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"run folder {path} has no complete checkpoint to export")
        return ckpt
    if not (path / HEAD).is_file():
        raise UserError(f"{path} is neither a run folder nor a checkpoint folder (no {HEAD})")
    problems = folder_problems(path)
    if problems:
        raise UserError(f"checkpoint {path} is damaged ({problems[0]}): export another checkpoint of the run")
    return path


def changed_tensors(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor the run wrote (release key names) and the head file's metadata."""
    tensors, meta = load_head_file(ckpt / HEAD)
    if "model_config" not in meta:
        raise UserError(f"{ckpt / HEAD} carries no model_config: not an alpamayo-cache checkpoint")
    if (ckpt / VLM_LAYERS).is_file():
        vlm, _ = load_head_file(ckpt / VLM_LAYERS)
        tensors.update(vlm)
    return tensors, meta


def _prepare(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to {out} exists and is not an empty folder: pass a new folder")
    out.mkdir(parents=True, exist_ok=True)


def _link_or_copy(src: Path, dst: Path, link: bool) -> str:
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:  # another filesystem, or links not allowed: copy instead
            pass
    shutil.copy2(src, dst)
    return "copied"


def _cast(key: str, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if tuple(new.shape) != tuple(old.shape):
        raise UserError(
            f"{key}: the run has shape {tuple(new.shape)}, the base {tuple(old.shape)}: base of another model size"
        )
    return new.to(old.dtype).contiguous()


def from_release(base: Path, changed: dict[str, torch.Tensor], out: Path, link: bool) -> dict[str, str]:
    """Export over a released folder; returns what happened to each shard (linked/copied/rewritten)."""
    release_config(base)
    index = base / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (base / SINGLE_NAME).is_file():
        with safe_open(str(base / SINGLE_NAME), "pt") as f:
            weight_map = {k: SINGLE_NAME for k in f.keys()}
    else:
        raise UserError(f"{base} has neither {INDEX_NAME} nor {SINGLE_NAME}: not a released checkpoint")
    unknown = sorted(set(changed) - set(weight_map))
    if unknown:
        raise UserError(
            f"the run has {unknown[0]} ({len(unknown)} in all), which {base} lacks: another architecture"
        )
    touched = {weight_map[k] for k in changed}
    done: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if shard not in touched:
            done[shard] = _link_or_copy(base / shard, out / shard, link)
            continue
        with safe_open(str(base / shard), "pt") as f:
            meta = f.metadata()
            tensors = {
                k: _cast(k, changed[k], f.get_tensor(k)) if k in changed else f.get_tensor(k)
                for k in f.keys()
            }
        write_safetensors(out / shard, tensors, meta)
        done[shard] = "rewritten"
    for path in sorted(base.iterdir()):  # config, index, tokenizer and other small files, as they are
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy2(path, out / path.name)
    return done


def release_config_dict(cfg: ModelConfig) -> dict:
    """config.json in the release's schema (what ``config.from_checkpoint_config`` reads back)."""
    t, v, e = cfg.text, cfg.vision, cfg.expert
    text = {
        "num_hidden_layers": t.num_layers, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
    }  # fmt: skip
    vision = {
        "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "deepstack_visual_indexes": list(v.deepstack_layers),
        "num_position_embeddings": v.num_position_embeddings, "out_hidden_size": t.hidden_size,
    }  # fmt: skip
    from dataclasses import asdict

    return {
        "model_type": "alpamayo_r1",
        "vocab_size": t.vocab_size,
        "vlm_config": {"text_config": text, "vision_config": vision},
        "expert_cfg": {
            "hidden_size": e.hidden_size,
            "intermediate_size": e.intermediate_size,
            "num_attention_heads": e.num_heads,
            "head_dim": e.head_dim,
        },
        "action_in_proj_cfg": asdict(cfg.action_in_proj),
        "action_space_cfg": asdict(cfg.action_space),
        "hist_traj_tokenizer_cfg": {"num_bins": cfg.hist_num_bins},
        "traj_token_start_idx": cfg.traj_token_start_idx,
        "traj_vocab_size": cfg.traj_vocab_size,
        "expert_non_causal_attention": cfg.expert_non_causal_attention,
    }


def whole_model(
    cfg: ModelConfig, changed: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, shard_bytes: int
) -> dict[str, str]:
    """Export over a preset: the seeded VLM and head with the run's tensors in place, sharded."""
    from alpamayo_cache.model.head import init_head
    from alpamayo_cache.model.vlm import build_vlm

    ids = {t: 0 for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    state = {f"vlm.{k}": v for k, v in build_vlm(cfg, ids, None, torch.float32, "cpu").state_dict().items()}
    state.update(init_head(cfg).state_dict())
    unknown = sorted(set(changed) - set(state))
    if unknown:
        raise UserError(f"the run has {unknown[0]} ({len(unknown)} in all), which {cfg.name} lacks")
    state.update({k: _cast(k, v, state[k]) for k, v in changed.items()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        value = state[key].to(dtype).contiguous()
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map, done = {}, {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, {"format": "pt"})
        weight_map.update({k: name for k in shard})
        done[name] = "written"
    total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
    (out / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(release_config_dict(cfg), indent=2))
    if cfg.name == "tiny":  # the tiny tokenizer is built offline: ship it so the folder is self-contained
        from alpamayo_cache.model.tokenizer import load_tokenizer

        load_tokenizer(cfg, None).save_pretrained(str(out))
    return done


def run(cfg: ExportConfig) -> Path:
    ckpt = checkpoint_folder(Path(cfg.run))
    changed, meta = changed_tensors(ckpt)
    model_cfg = ModelConfig.from_dict(meta["model_config"])  # type: ignore[arg-type]
    base = str(meta.get("base", model_cfg.name)) if cfg.base == "auto" else cfg.base
    out = Path(cfg.to)  # type: ignore[arg-type]
    if Path(base).resolve() == out.resolve():
        raise UserError("--to must differ from the base folder")
    _prepare(out)
    log.info(f"export: {ckpt} ({len(changed)} changed tensors) over {base} -> {out}")
    try:
        if Path(base).is_dir():
            done = from_release(Path(base), changed, out, cfg.link)
        else:
            resolve_model(base)  # a preset name, or a clear error
            dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
            done = whole_model(model_cfg, changed, out, dtype, int(cfg.shard_gb * 1e9))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written stays behind
        raise
    record = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "base": base,
        "changed": len(changed),
        "shards": done,
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    log.info(
        f"exported {len(done)} shard(s), {human_bytes(size)}: "
        + ", ".join(f"{k} {v}" for k, v in done.items())
    )
    return out
