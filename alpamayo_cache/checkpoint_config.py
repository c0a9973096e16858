"""A local release folder's config.json -> ModelConfig, for the three releases' layouts.

- ``alpamayo_r1`` and ``alpamayo1_5``: ``vlm_config`` (a Qwen3-VL config), ``expert_cfg`` (overrides of the
  VLM text config), ``action_in_proj_cfg``, ``action_space_cfg``, trajectory tokenizer configs. 1.5 keeps
  R1's layout; its preset adds the labelled prompt, the route, and buffers rebuilt from this file.
- ``alpamayo2_super``: ``vlm_config``, ``expert_config`` = {``llm_config`` (a full text-model config:
  the expert's own width and depth), ``action_space_cfg``, ``action_in_proj_cfg``, ...}, ``traj_ids``,
  ``history_vocab_size`` / ``future_vocab_size`` (history tokens first), ``hist_traj_tokenizer_cfg``
  (``pad_origin_at_beginning`` False -> 45 history tokens), ``include_camera_ids``, ``frame_label``.

Whatever the file does not say comes from the release's preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from alpamayo_cache.config import (
    ALPAMAYO_2_SUPER,
    ALPAMAYO_15,
    REAL,
    ActionInProjConfig,
    ActionSpaceConfig,
    ExpertConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.weights import release_config

# model_type -> the preset whose prompt layout and defaults that release uses.
BASES: dict[str, ModelConfig] = {
    "alpamayo_r1": REAL,
    "alpamayo1_5": ALPAMAYO_15,
    "alpamayo2_super": ALPAMAYO_2_SUPER,
}


def _text(text: dict, base: TextConfig, vocab: int | None) -> TextConfig:
    rope = text.get("rope_scaling") or {}
    return TextConfig(
        num_layers=text.get("num_hidden_layers", base.num_layers),
        hidden_size=text.get("hidden_size", base.hidden_size),
        intermediate_size=text.get("intermediate_size", base.intermediate_size),
        num_heads=text.get("num_attention_heads", base.num_heads),
        num_kv_heads=text.get("num_key_value_heads", base.num_kv_heads),
        head_dim=text.get("head_dim", base.head_dim),
        vocab_size=vocab or text.get("vocab_size", base.vocab_size),
        rms_norm_eps=text.get("rms_norm_eps", base.rms_norm_eps),
        rope_theta=text.get("rope_theta", base.rope_theta),
        mrope_section=tuple(rope.get("mrope_section", base.mrope_section)),
    )


def _vision(vision: dict, base: VisionConfig) -> VisionConfig:
    return VisionConfig(
        depth=vision.get("depth", base.depth),
        hidden_size=vision.get("hidden_size", base.hidden_size),
        intermediate_size=vision.get("intermediate_size", base.intermediate_size),
        num_heads=vision.get("num_heads", base.num_heads),
        patch_size=vision.get("patch_size", base.patch_size),
        temporal_patch_size=vision.get("temporal_patch_size", base.temporal_patch_size),
        spatial_merge_size=vision.get("spatial_merge_size", base.spatial_merge_size),
        deepstack_layers=tuple(vision.get("deepstack_visual_indexes", base.deepstack_layers)),
        num_position_embeddings=vision.get("num_position_embeddings", base.num_position_embeddings),
    )


def _known(cls: type, data: dict, base: Any) -> Any:
    """``base`` with the fields of dataclass ``cls`` that ``data`` sets (lists become tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return dataclasses.replace(base, **values)


def read_checkpoint_config(folder: Path) -> ModelConfig:
    """The dimensions and layout of a local R1 / 1.5 / 2 Super checkpoint folder."""
    cfg = release_config(folder)
    base = BASES[cfg["model_type"]]
    vlm = cfg.get("vlm_config") or cfg
    text = vlm.get("text_config", {})
    vision = _vision(vlm.get("vision_config", {}), base.vision)
    if cfg["model_type"] == "alpamayo2_super":
        return _super(cfg, base, text, vision, folder)
    expert_over = cfg.get("expert_cfg") or {}
    hist_tok = cfg.get("hist_traj_tokenizer_cfg") or {}
    fut_tok = cfg.get("traj_tokenizer_cfg")
    expert = ExpertConfig(
        hidden_size=expert_over.get("hidden_size", base.expert.hidden_size),
        intermediate_size=expert_over.get("intermediate_size", base.expert.intermediate_size),
        num_heads=expert_over.get("num_attention_heads", base.expert.num_heads),
        head_dim=expert_over.get("head_dim", base.expert.head_dim),
    )
    # With a separate future tokenizer, history bins sit after its vocabulary (release convention).
    hist_offset = int(fut_tok.get("num_bins", 0)) if (fut_tok and hist_tok) else 0
    return dataclasses.replace(
        base,
        name=f"checkpoint:{Path(folder).name}",
        text=_text(text, base.text, cfg.get("vocab_size")),
        vision=vision,
        expert=expert,
        action_in_proj=_known(ActionInProjConfig, cfg.get("action_in_proj_cfg") or {}, base.action_in_proj),
        action_space=_known(ActionSpaceConfig, cfg.get("action_space_cfg") or {}, base.action_space),
        traj_token_start_idx=cfg.get("traj_token_start_idx", base.traj_token_start_idx),
        traj_vocab_size=cfg.get("traj_vocab_size", base.traj_vocab_size),
        hist_token_offset=hist_offset,
        hist_num_bins=int(hist_tok.get("num_bins", base.hist_num_bins)),
        expert_non_causal_attention=cfg.get("expert_non_causal_attention", True),
    )


def _super(cfg: dict, base: ModelConfig, text: dict, vision: VisionConfig, folder: Path) -> ModelConfig:
    """2 Super: the expert is a full text config of its own (width and depth independent of the VLM)."""
    expert_cfg = cfg.get("expert_config") or {}
    llm = expert_cfg.get("llm_config") or {}
    vlm_text = _text(text, base.text, None)
    expert = ExpertConfig(
        hidden_size=llm.get("hidden_size", base.expert.hidden_size),
        intermediate_size=llm.get("intermediate_size", base.expert.intermediate_size),
        num_heads=llm.get("num_attention_heads", base.expert.num_heads),
        head_dim=llm.get("head_dim", base.expert.head_dim),
        num_layers=llm.get("num_hidden_layers", base.expert.num_layers),
    )
    kv_heads = llm.get("num_key_value_heads", vlm_text.num_kv_heads)
    if kv_heads != vlm_text.num_kv_heads:
        raise UserError(
            f"{folder}: the expert has {kv_heads} kv-heads, the VLM {vlm_text.num_kv_heads}; they must match "
            "(the expert's keys are concatenated to the VLM's cache)"
        )
    hist_tok = cfg.get("hist_traj_tokenizer_cfg") or {}
    history_tokens = 48 if hist_tok.get("pad_origin_at_beginning", True) else 45
    traj_ids = cfg.get("traj_ids") or {}
    hist_vocab = int(cfg.get("history_vocab_size", 1000))
    fut_vocab = int(cfg.get("future_vocab_size", 3000))
    frame_label = cfg.get("frame_label", "frame_num")
    if frame_label == "dt_token":
        raise UserError(f"{folder}: frame_label 'dt_token' is not supported (only 'frame_num' or 'none')")
    return dataclasses.replace(
        base,
        name=f"checkpoint:{Path(folder).name}",
        text=vlm_text,
        vision=vision,
        expert=expert,
        action_in_proj=_known(
            ActionInProjConfig, expert_cfg.get("action_in_proj_cfg") or {}, base.action_in_proj
        ),
        action_space=_known(ActionSpaceConfig, expert_cfg.get("action_space_cfg") or {}, base.action_space),
        traj_token_start_idx=int(traj_ids.get("history_id0", base.traj_token_start_idx)),
        traj_vocab_size=hist_vocab + fut_vocab,
        hist_token_offset=0,  # history tokens come first in 2 Super's vocabulary
        hist_num_bins=int(hist_tok.get("num_bins", hist_vocab)),
        history_tokens=history_tokens,
        camera_labels=bool(cfg.get("include_camera_ids", True)),
        frame_labels=frame_label == "frame_num",
        expert_non_causal_attention=expert_cfg.get("expert_non_causal_attention", True),
    )
