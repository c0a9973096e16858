"""Model configuration: frozen dataclasses, the named presets, and reading a checkpoint's config.json.

Two presets exist:
- ``alpamayo-r1-10b``: the released dimensions (Qwen3-VL-8B VLM + 2.3 B action expert).
- ``tiny``: the same transformers classes at toy size, so every stage runs on a CPU in seconds.

Shape legend used across the package: b batch, l layers, h kv-heads, t tokens, d head dim, w waypoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpamayo_cache.errors import UserError

# The order cameras appear in the prompt (REFERENCE §2). Camera-major: all frames of one camera first.
ALL_CAMERAS: tuple[str, ...] = (
    "camera_cross_left_120fov",
    "camera_front_wide_120fov",
    "camera_cross_right_120fov",
    "camera_front_tele_30fov",
)


@dataclass(frozen=True)
class TextConfig:
    """Qwen3-VL text decoder (the VLM's language model)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise UserError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}; fix the preset"
            )


@dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL vision tower."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    deepstack_layers: tuple[int, ...] = (8, 16, 24)
    num_position_embeddings: int = 2304


@dataclass(frozen=True)
class ExpertConfig:
    """Overrides applied to the VLM text config to build the action expert (REFERENCE §1)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class ActionInProjConfig:
    hidden_size: int = 512
    num_enc_layers: int = 2
    max_freq: float = 100.0
    num_fourier_feats: int = 20


@dataclass(frozen=True)
class ActionSpaceConfig:
    """Unicycle (accel, curvature) action space with the released smoothing and normalisation."""

    accel_mean: float = 0.02902694707164455
    accel_std: float = 0.6810426736454882
    curvature_mean: float = 0.0002692167976330542
    curvature_std: float = 0.026148280660833106
    accel_bounds: tuple[float, float] = (-9.8, 9.8)
    curvature_bounds: tuple[float, float] = (-0.33, 0.33)
    dt: float = 0.1
    n_waypoints: int = 64
    theta_lambda: float = 1e-6
    theta_ridge: float = 1e-8
    v_lambda: float = 1e-6
    v_ridge: float = 1e-4
    a_lambda: float = 1e-4
    a_ridge: float = 1e-4
    kappa_lambda: float = 1e-4
    kappa_ridge: float = 1e-4


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the model and the prompt it reads."""

    name: str
    text: TextConfig
    vision: VisionConfig
    expert: ExpertConfig
    action_in_proj: ActionInProjConfig = field(default_factory=ActionInProjConfig)
    action_space: ActionSpaceConfig = field(default_factory=ActionSpaceConfig)
    # Images fed to the VLM after resizing (height, width) in pixels.
    image_size: tuple[int, int] = (320, 576)
    cameras: tuple[str, ...] = ALL_CAMERAS
    frames_per_camera: int = 4
    frame_step_s: float = 0.1
    history_steps: int = 16
    # Token ids: the first trajectory token <i0>, and where the history tokenizer's bins start in it.
    traj_token_start_idx: int = 151_669
    traj_vocab_size: int = 4000
    hist_token_offset: int = 0
    hist_num_bins: int = 1000
    expert_non_causal_attention: bool = True
    # Seed used to initialise random weights (tiny preset, or the real dims without a checkpoint).
    init_seed: int = 0

    @property
    def n_waypoints(self) -> int:
        return self.action_space.n_waypoints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        from alpamayo_cache.options import from_dict

        return from_dict(cls, data, "model config")


REAL = ModelConfig(
    name="alpamayo-r1-10b",
    text=TextConfig(
        num_layers=36,
        hidden_size=4096,
        intermediate_size=12288,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=155_697,
    ),
    vision=VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16),
    expert=ExpertConfig(hidden_size=2048, intermediate_size=8256, num_heads=16, head_dim=128),
)

# The tiny preset's vocabulary: 256 bytes + 7 Qwen specials + 1000 trajectory tokens + 28 Alpamayo
# specials, rounded up. model/tokenizer.py builds that tokenizer offline and checks it fits.
TINY_VOCAB_SIZE = 1_296

TINY = ModelConfig(
    name="tiny",
    text=TextConfig(
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=TINY_VOCAB_SIZE,
        mrope_section=(4, 2, 2),
    ),
    vision=VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        deepstack_layers=(0,),
        num_position_embeddings=64,
    ),
    expert=ExpertConfig(hidden_size=48, intermediate_size=80, num_heads=4, head_dim=16),
    action_in_proj=ActionInProjConfig(hidden_size=32, num_enc_layers=2),
    image_size=(64, 96),
    cameras=ALL_CAMERAS,
    frames_per_camera=2,
    traj_token_start_idx=263,
    traj_vocab_size=1000,
)

PRESETS: dict[str, ModelConfig] = {REAL.name: REAL, TINY.name: TINY}


def from_checkpoint_config(folder: Path) -> ModelConfig:
    """Read the dimensions of a local Alpamayo-R1 checkpoint folder from its config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: point at an Alpamayo-R1 checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: the checkpoint folder is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "alpamayo_r1":
        raise UserError(
            f"{path} has model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, not "
            "'alpamayo_r1': not an Alpamayo-R1 checkpoint"
        )
    vlm = cfg.get("vlm_config") or cfg
    text = vlm.get("text_config", {})
    vision = vlm.get("vision_config", {})
    rope = text.get("rope_scaling") or {}
    expert_over = cfg.get("expert_cfg") or {}
    proj = cfg.get("action_in_proj_cfg") or {}
    space = cfg.get("action_space_cfg") or {}
    hist_tok = cfg.get("hist_traj_tokenizer_cfg") or {}
    fut_tok = cfg.get("traj_tokenizer_cfg")
    base = REAL
    text_cfg = TextConfig(
        num_layers=text.get("num_hidden_layers", base.text.num_layers),
        hidden_size=text.get("hidden_size", base.text.hidden_size),
        intermediate_size=text.get("intermediate_size", base.text.intermediate_size),
        num_heads=text.get("num_attention_heads", base.text.num_heads),
        num_kv_heads=text.get("num_key_value_heads", base.text.num_kv_heads),
        head_dim=text.get("head_dim", base.text.head_dim),
        vocab_size=cfg.get("vocab_size", text.get("vocab_size", base.text.vocab_size)),
        rms_norm_eps=text.get("rms_norm_eps", base.text.rms_norm_eps),
        rope_theta=text.get("rope_theta", base.text.rope_theta),
        mrope_section=tuple(rope.get("mrope_section", base.text.mrope_section)),
    )
    vision_cfg = VisionConfig(
        depth=vision.get("depth", base.vision.depth),
        hidden_size=vision.get("hidden_size", base.vision.hidden_size),
        intermediate_size=vision.get("intermediate_size", base.vision.intermediate_size),
        num_heads=vision.get("num_heads", base.vision.num_heads),
        patch_size=vision.get("patch_size", base.vision.patch_size),
        temporal_patch_size=vision.get("temporal_patch_size", base.vision.temporal_patch_size),
        spatial_merge_size=vision.get("spatial_merge_size", base.vision.spatial_merge_size),
        deepstack_layers=tuple(vision.get("deepstack_visual_indexes", base.vision.deepstack_layers)),
        num_position_embeddings=vision.get("num_position_embeddings", base.vision.num_position_embeddings),
    )
    expert_cfg = ExpertConfig(
        hidden_size=expert_over.get("hidden_size", base.expert.hidden_size),
        intermediate_size=expert_over.get("intermediate_size", base.expert.intermediate_size),
        num_heads=expert_over.get("num_attention_heads", base.expert.num_heads),
        head_dim=expert_over.get("head_dim", base.expert.head_dim),
    )
    space_fields = {f.name for f in dataclasses.fields(ActionSpaceConfig)}
    space_cfg = ActionSpaceConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in space.items() if k in space_fields}
    )
    proj_fields = {f.name for f in dataclasses.fields(ActionInProjConfig)}
    proj_cfg = ActionInProjConfig(**{k: v for k, v in proj.items() if k in proj_fields})
    # With a separate future tokenizer, history bins sit after its vocabulary (release convention).
    hist_offset = int(fut_tok.get("num_bins", 0)) if (fut_tok and hist_tok) else 0
    return dataclasses.replace(
        base,
        name=f"checkpoint:{Path(folder).name}",
        text=text_cfg,
        vision=vision_cfg,
        expert=expert_cfg,
        action_in_proj=proj_cfg,
        action_space=space_cfg,
        traj_token_start_idx=cfg.get("traj_token_start_idx", base.traj_token_start_idx),
        traj_vocab_size=cfg.get("traj_vocab_size", base.traj_vocab_size),
        hist_token_offset=hist_offset,
        hist_num_bins=int(hist_tok.get("num_bins", base.hist_num_bins)),
        expert_non_causal_attention=cfg.get("expert_non_causal_attention", True),
    )


def resolve_model(spec: str) -> ModelConfig:
    """A preset name, or a path to a checkpoint folder / saved config json."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        return from_checkpoint_config(path)
    if path.is_file() and path.suffix == ".json":
        from alpamayo_cache.options import read_config_file

        return ModelConfig.from_dict(read_config_file(path))
    raise UserError(f"{spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing checkpoint folder")
