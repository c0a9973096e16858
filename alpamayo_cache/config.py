"""Model configuration: frozen dataclasses, the named presets, and reading a checkpoint's config.json.

Presets (a release is a ModelConfig; code branches on its fields, never on a preset's name):
- ``alpamayo-r1-10b``: the released R1 dimensions (Qwen3-VL-8B VLM + 2.3 B action expert);
- ``alpamayo-1.5-10b``: R1's weights layout and sizes, the 1.5 prompt (camera and frame labels, optional
  route with classifier-free guidance), buffers rebuilt from config.json;
- ``alpamayo-2-super``: a 32 B Qwen3-VL-type VLM with a separate 2.4 B expert (dims from third-party
  reports, unconfirmed), ``expert.``-prefixed head keys, 45 history tokens, 6 labelled cameras;
- ``tiny``, ``tiny-1.5``, ``tiny-2super``: the same transformers classes at toy size, so every stage
  runs on a CPU in seconds.

Shape legend used across the package: b batch, l layers, h kv-heads, t tokens, d head dim, w waypoints.
"""

from __future__ import annotations

import dataclasses
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
# The release camera ids (Alpamayo 1.5 / 2 Super loaders): prompts order cameras by id, 1.5 and 2 Super
# label each camera with its display name (model/prompt.py). The default 4-camera set is [0, 1, 2, 6].
CAMERA_IDS: dict[str, int] = {
    "camera_cross_left_120fov": 0,
    "camera_front_wide_120fov": 1,
    "camera_cross_right_120fov": 2,
    "camera_rear_left_70fov": 3,
    "camera_rear_tele_30fov": 4,
    "camera_rear_right_70fov": 5,
    "camera_front_tele_30fov": 6,
}
RING_CAMERAS: tuple[str, ...] = tuple(sorted(CAMERA_IDS, key=CAMERA_IDS.__getitem__))  # all 7, by id
ROUTE_FORMATS = ("none", "tokens", "raw")
BUFFER_DTYPES = ("fp32", "bf16")


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
    """Overrides applied to the VLM text config to build the action expert (REFERENCE §1).

    ``num_layers`` None: as deep as the VLM (R1, 1.5). A shallower expert (2 Super's layout allows any
    depth up to the VLM's) reads the FIRST VLM layers: expert layer i attends to VLM layer i's K/V. The
    kv-heads and head_dim are always the VLM's: the expert's own K/V are concatenated to the cache."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    num_layers: int | None = None


@dataclass(frozen=True)
class ActionInProjConfig:
    hidden_size: int = 512
    num_enc_layers: int = 2
    max_freq: float = 100.0
    num_fourier_feats: int = 20
    # "bf16": the Fourier frequencies take bf16-rounded values (1, 1.671875, 2.78125, ...), as the 1.5 and
    # 2 Super releases rebuild them from config.json when loaded with dtype=bf16 (the arithmetic stays fp32).
    freqs_dtype: str = "fp32"


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
    # "bf16": the normalisation stats take bf16-rounded values, as the 1.5 / 2 Super releases rebuild
    # them from config.json when loaded with dtype=bf16 (accel_mean 0.029052734375, ...).
    stats_dtype: str = "fp32"
    # 2 Super's training targets: the solved curvature is clamped to curvature_bounds, then zeroed where
    # the speed at either end of the step is below this many m/s (0 = off, R1 and 1.5).
    target_low_speed_mps: float = 0.0
    clamp_target_curvature: bool = False


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
    # The release this configuration follows: messages and the store-compatibility check only.
    release: str = "alpamayo-r1"
    # Prompt layout. Labels: "<display name>: " before each camera's first frame, "frame k " before each
    # image (1.5, 2 Super). history_tokens: 48, or 45 = the last 45 (2 Super without the origin pad).
    camera_labels: bool = False
    frame_labels: bool = False
    history_tokens: int = 48
    # Navigation route: none | tokens (<|route_start|>text<|route_end|> after the history, 1.5) | raw
    # (the bare text there, 2 Super's nav demo). A routed sample also stores its unguided prefix.
    route: str = "none"
    # The assistant turn opens with <|cot_start|> (R1, 1.5); False: it is left to the model (2 Super).
    cot_prefill: bool = True
    # Checkpoint key prefix of the head: "" (expert.*, action_in_proj.*) or "expert." (2 Super:
    # expert.expert.*, expert.action_in_proj.*, expert.action_out_proj.*), mapped on load and export.
    head_key_prefix: str = ""
    # Fourier frequencies (and action stats) come from config.json; checkpoint copies are ignored (1.5, 2 Super).
    buffers_from_config: bool = False
    # A toy-size preset: builds its byte-level tokenizer offline, trains with a larger default lr.
    toy: bool = False

    def __post_init__(self) -> None:
        if self.route not in ROUTE_FORMATS:
            raise UserError(f"model route {self.route!r} must be one of {ROUTE_FORMATS}")
        if self.history_tokens not in (3 * self.history_steps, 3 * (self.history_steps - 1)):
            raise UserError(
                f"history_tokens {self.history_tokens} must be {3 * self.history_steps} (origin-padded) or "
                f"{3 * (self.history_steps - 1)} for {self.history_steps} history poses"
            )
        if self.expert.head_dim != self.text.head_dim:
            raise UserError(
                f"expert head_dim {self.expert.head_dim} must equal the VLM's {self.text.head_dim}: the expert "
                "attends to the VLM's cached keys"
            )
        if not 1 <= self.expert_layers <= self.text.num_layers:
            raise UserError(
                f"expert num_layers {self.expert_layers} must be between 1 and the VLM's {self.text.num_layers} "
                "(expert layer i reads VLM layer i)"
            )
        for value in (self.action_in_proj.freqs_dtype, self.action_space.stats_dtype):
            if value not in BUFFER_DTYPES:
                raise UserError(f"buffer dtype {value!r} must be one of {BUFFER_DTYPES}")

    @property
    def n_waypoints(self) -> int:
        return self.action_space.n_waypoints

    @property
    def expert_layers(self) -> int:
        """Depth of the expert (it reads VLM layers 0 .. expert_layers - 1)."""
        return self.expert.num_layers or self.text.num_layers

    def prompt_signature(self) -> dict[str, Any]:
        """What fixes the prompt (and so every cached K/V) besides the VLM weights: stores made under
        different signatures never mix, and a head is refused on a store of another signature."""
        return {
            "release": self.release,
            "camera_labels": self.camera_labels,
            "frame_labels": self.frame_labels,
            "history_tokens": self.history_tokens,
            "route": self.route,
            "cot_prefill": self.cot_prefill,
        }

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
    toy=True,
)

# The release-exact buffers of 1.5 and 2 Super as every release notebook loads them (dtype=bf16).
_BF16_BUFFERS = {
    "action_in_proj": ActionInProjConfig(freqs_dtype="bf16"),
    "action_space": ActionSpaceConfig(stats_dtype="bf16"),
    "buffers_from_config": True,
}
# Alpamayo 1.5 (NVlabs/alpamayo1.5 @ f42e594): R1's weights and sizes, the labelled prompt with an
# optional route. The inference builder always asks for reasoning (its use_nav_prompt flag is dead).
_PROMPT_15 = {"release": "alpamayo-1.5", "camera_labels": True, "frame_labels": True, "route": "tokens"}
ALPAMAYO_15 = dataclasses.replace(REAL, name="alpamayo-1.5-10b", **_PROMPT_15, **_BF16_BUFFERS)
TINY_15 = dataclasses.replace(
    TINY, name="tiny-1.5", frames_per_camera=4, **_PROMPT_15, buffers_from_config=True
)

# Alpamayo 2 Super: the 6 cameras of its trajectory profile (ids 0, 1, 2, 3, 5, 6), history tokens first
# (<i0>.. history, <i1000>.. future), no <|cot_start|> prefill, head keys under "expert.".
SUPER_CAMERAS = tuple(c for c in RING_CAMERAS if CAMERA_IDS[c] != 4)
_PROMPT_2S = {
    "release": "alpamayo-2-super",
    "cameras": SUPER_CAMERAS,
    "camera_labels": True,
    "frame_labels": True,
    "route": "raw",
    "cot_prefill": False,
    "head_key_prefix": "expert.",
    "hist_token_offset": 0,
    "traj_vocab_size": 4000,
}
_SUPER_SPACE = {"target_low_speed_mps": 0.6, "clamp_target_curvature": True}
# Dimensions: third-party reports (ALPAMAYO_RELEASES.md), not in any primary file; 45 history tokens
# likewise (the code default is 48). Embedding rows 155,776 = the 155,697 tokens rounded up to x128.
ALPAMAYO_2_SUPER = ModelConfig(
    name="alpamayo-2-super",
    text=TextConfig(
        num_layers=64,
        hidden_size=5120,
        intermediate_size=25600,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=155_776,
    ),
    vision=VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16),
    expert=ExpertConfig(hidden_size=1536, intermediate_size=6144, num_heads=16, head_dim=128, num_layers=64),
    action_in_proj=ActionInProjConfig(freqs_dtype="bf16"),
    action_space=ActionSpaceConfig(stats_dtype="bf16", **_SUPER_SPACE),
    buffers_from_config=True,
    history_tokens=45,
    **_PROMPT_2S,
)
# 263 base tokens + 4,000 trajectory tokens + 28 specials = 4,291, rounded up to x128 as 2 Super does.
TINY_2S_VOCAB_SIZE = 4_352
TINY_2S = dataclasses.replace(
    TINY,
    name="tiny-2super",
    text=dataclasses.replace(TINY.text, num_layers=4, vocab_size=TINY_2S_VOCAB_SIZE),
    expert=ExpertConfig(hidden_size=48, intermediate_size=64, num_heads=4, head_dim=16, num_layers=2),
    action_space=ActionSpaceConfig(**_SUPER_SPACE),
    buffers_from_config=True,
    history_tokens=45,
    **_PROMPT_2S,
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (REAL, TINY, ALPAMAYO_15, TINY_15, ALPAMAYO_2_SUPER, TINY_2S)
}


def from_checkpoint_config(folder: Path) -> ModelConfig:
    """The model of a local Alpamayo checkpoint folder (R1, 1.5 or 2 Super), read from its config.json."""
    from alpamayo_cache.checkpoint_config import read_checkpoint_config

    return read_checkpoint_config(folder)


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
