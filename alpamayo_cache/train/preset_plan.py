"""``train --dry-run --model <preset>``: the memory plan of expert training for a model no store exists for
yet (e.g. Alpamayo 2 Super before anyone has run its 32 B VLM), from the preset alone.

It plans the CUDA run the user would make (bf16 weights, gradient checkpointing, 8-bit AdamW when
``--optimizer auto``: ``pip install alpamayo-cache[gpu]`` brings bitsandbytes), for prefixes of
``--prefix-len`` tokens or an estimate from the preset's prompt layout, and says what precompute needs:
the VLM's weights on the precompute GPU, which training never loads.
"""

from __future__ import annotations

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.prompt import tokens_per_image
from alpamayo_cache.runtime import human_bytes, log
from alpamayo_cache.store.format import kv_bytes_per_token
from alpamayo_cache.train.plan import GIB, TrainPlan, plan_for

# Text tokens of the chat scaffolding, system text and instruction (R1 traj-only: 31 measured), and per
# label with Qwen's BPE ("Front left camera: " ~5, "frame 0 " ~4: digits are single tokens).
SCAFFOLD_TOKENS = 35
CAMERA_LABEL_TOKENS = 5
FRAME_LABEL_TOKENS = 4


def estimate_prefix_len(model: ModelConfig) -> int:
    """Prefix tokens of one sample with the model's default cameras (images exact, text estimated).
    R1: 2,997 (measured 2,993); 2 Super (6 cameras x 4 frames, labels, 45 history tokens): 4,576."""
    cameras = len(model.cameras)
    images = cameras * model.frames_per_camera
    labels = (
        cameras * CAMERA_LABEL_TOKENS * model.camera_labels + images * FRAME_LABEL_TOKENS * model.frame_labels
    )
    history = model.history_tokens + 2  # with <|traj_history_start|>, <|traj_history_end|>
    return images * (tokens_per_image(model) + 2) + labels + SCAFFOLD_TOKENS + history


def vlm_parameter_count(model: ModelConfig) -> int:
    """Parameters of the VLM (language model with untied embeddings and head, vision tower, merger)."""
    t, v = model.text, model.vision
    q = t.hidden_size * t.num_heads * t.head_dim
    kv = 2 * t.hidden_size * t.num_kv_heads * t.head_dim
    layer = q + kv + q + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size + 2 * t.head_dim
    text = t.num_layers * layer + 2 * t.vocab_size * t.hidden_size + t.hidden_size
    patch = 3 * v.temporal_patch_size * v.patch_size**2 * v.hidden_size
    block = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size + 9 * v.hidden_size
    merged = v.hidden_size * v.spatial_merge_size**2
    merger = merged * merged + merged * t.hidden_size + 2 * merged
    vision = patch + v.depth * block + (1 + len(v.deepstack_layers)) * merger
    return text + vision + v.num_position_embeddings * v.hidden_size


def preset_plan(cfg: TrainConfig) -> TrainPlan:
    """Print the plan for ``cfg.model``; refuse one that does not fit ``--gpu-memory-gb``."""
    model = resolve_model(cfg.model)
    estimated = cfg.prefix_len is None
    prefix_len = estimate_prefix_len(model) if estimated else int(cfg.prefix_len)  # type: ignore[arg-type]
    optimizer = "adamw8bit" if cfg.optimizer == "auto" else cfg.optimizer
    checkpointing = cfg.checkpointing != "off"
    plan = plan_for(cfg, model, prefix_len, "cuda", optimizer, checkpointing, "bf16")
    t = model.text
    per_token = kv_bytes_per_token(t.num_layers, t.num_kv_heads, t.head_dim, "bf16")
    vlm_bytes = vlm_parameter_count(model) * 2
    log.info(
        f"{model.name}: prefix L = {prefix_len} tokens ({'estimated from the preset; pass --prefix-len for a measured one' if estimated else '--prefix-len'}); "
        f"KV bytes per sample {human_bytes(per_token * prefix_len)} in bf16 ({per_token:,} B/token: "
        f"{t.num_layers} layers x K,V x {t.num_kv_heads} kv-heads x {t.head_dim} x 2 B); expert "
        f"{model.expert_layers} layers x {model.expert.hidden_size} wide on a {t.num_layers}-layer VLM"
    )
    log.info(plan.describe(cfg.gpu_memory_gb))
    log.info(
        f"precompute needs the VLM's ~{human_bytes(vlm_bytes)} of bf16 weights ({vlm_parameter_count(model) / 1e9:.1f} B "
        "parameters) on its GPU plus activations: run it once on a large GPU; training never loads them"
    )
    if plan.memory.total > cfg.gpu_memory_gb * GIB:
        raise UserError(
            f"the plan needs {plan.memory.total / GIB:.1f} GiB, more than --gpu-memory-gb {cfg.gpu_memory_gb}: "
            "use --optimizer adamw8bit, --checkpointing on, a smaller --micro-batch, or --train lora"
        )
    return plan
