"""Everything a training run needs before its first step: samples, starting weights, what trains,
precision, optimizer and schedule, and the accelerate runtime (devices, DDP, trackers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.head import head_config, load_head
from alpamayo_cache.model.policy import Policy
from alpamayo_cache.model.weights import REBUILT_SUFFIX, is_head_key, save_tensors, to_release_keys
from alpamayo_cache.runtime import compute_dtype, log, resolve_device
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train.checkpoints import HEAD, resolve_checkpoint
from alpamayo_cache.train.optim import cosine_with_warmup, make_optimizer, resolve_optimizer

# The parameter groups a scope trains, as top-level module names (= the released key prefixes).
GROUPS_BY_SCOPE = {
    "all": ("expert", "action_in_proj", "action_out_proj"),
    "heads": ("action_in_proj", "action_out_proj"),
    "lora": ("expert", "action_in_proj", "action_out_proj"),
    "vlm-top": ("expert", "action_in_proj", "action_out_proj"),  # + the VLM layers' own file
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def select_samples(reader: StoreReader, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    camera_sets = list(cfg.camera_sets) or None
    train_ids = reader.select(cfg.split, camera_sets)
    if not train_ids:
        raise UserError(
            f"split {cfg.split!r} of {cfg.store} has no samples (camera sets {camera_sets or 'all'})"
        )
    val_ids = reader.select(cfg.val_split, camera_sets) if cfg.val_split else []
    if cfg.route_dropout > 0 and not any(reader.sample_info(s).has_route for s in train_ids):
        log.warning(f"--route-dropout {cfg.route_dropout}: no training sample has a route, nothing to drop")
    if cfg.val_split and not val_ids:
        log.warning(
            f"split {cfg.val_split!r} of {cfg.store} is empty: no validation loss, and eval's default split "
            "has nothing to score (precompute more clips or a larger --val-percent)"
        )
    return train_ids, val_ids


def resolve_init(init: str, reader: StoreReader) -> str:
    """``auto``: the preset the store was made with (a store made from a release folder needs --init); a
    run or checkpoint folder: its (newest intact) head file; anything else as given."""
    path = Path(init)
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / HEAD).is_file()):
        return resolve_checkpoint(init)  # a run: its newest intact checkpoint's head
    if init != "auto":
        return init
    if reader.info.model_identity.startswith("preset:"):
        return reader.info.model_name
    raise UserError(
        f"the store was made from {reader.info.model_name}; pass --init <that Alpamayo-R1 folder> for the starting weights"
    )


def check_head_matches_store(head_cfg: ModelConfig, store_cfg: ModelConfig, source: str) -> None:
    """The head must read the cache the store holds: the same prompt layout (release) and K/V shapes."""
    mine, theirs = head_cfg.prompt_signature(), store_cfg.prompt_signature()
    if mine != theirs:
        field = next(k for k in mine if mine[k] != theirs[k])
        raise UserError(
            f"the store was made for {theirs['release']} ({field} {theirs[field]}), {source} is {mine['release']} "
            f"({field} {mine[field]}): use a store made with this model, or a model of the store's release"
        )
    if head_cfg.expert_layers > store_cfg.text.num_layers:
        raise UserError(
            f"{source} has {head_cfg.expert_layers} expert layers, the store holds {store_cfg.text.num_layers} "
            "VLM layers: checkpoint of another architecture"
        )
    h, s = head_cfg.text, store_cfg.text
    if (h.num_layers, h.num_kv_heads, h.head_dim) != (s.num_layers, s.num_kv_heads, s.head_dim):
        raise UserError(
            f"{source} expects {h.num_layers} layers x {h.num_kv_heads} kv-heads x {h.head_dim}, the store holds "
            f"{s.num_layers} x {s.num_kv_heads} x {s.head_dim}: checkpoint of another architecture"
        )


def check_init(cfg: TrainConfig, reader: StoreReader, store_cfg: ModelConfig) -> str:
    """Resolve the starting weights and refuse ones of another architecture, reading no tensor
    (so a dry run and a bad --init fail before any work or output)."""
    init = resolve_init(cfg.init, reader)
    head_cfg, described = head_config(init)
    check_head_matches_store(head_cfg, store_cfg, described)
    return init


def apply_scope(policy: Policy, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze what is not trained; inject LoRA adapters for scope 'lora'. Returns trainable params.
    Scope 'vlm-top' trains the expert as ``--vlm-expert`` says and the VLM's top layers (``policy.vlm``)."""
    policy.requires_grad_(False)
    policy.action_in_proj.requires_grad_(True)
    policy.action_out_proj.requires_grad_(True)
    expert_scope = cfg.vlm_expert if cfg.scope == "vlm-top" else cfg.scope
    if cfg.scope == "vlm-top":
        from alpamayo_cache.model.vlm_top import make_trainable

        if not hasattr(policy, "vlm"):
            raise UserError(
                f"--train vlm-top needs a store made with --vlm-from-layer K; {cfg.store} holds every layer's K/V"
            )
        make_trainable(policy.vlm, cfg.vlm_train, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if expert_scope == "all":
        policy.expert.requires_grad_(True)
    elif expert_scope == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=LORA_TARGETS,
            lora_dropout=0.0,
            init_lora_weights=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            inject_adapter_in_model(lora, policy.expert)
        for name, p in policy.expert.named_parameters():
            p.requires_grad_("lora_" in name)
    return [p for p in policy.parameters() if p.requires_grad]


def export_checkpoint(setup: Setup, cfg: TrainConfig, path: Path, step: int, vlm_identity: str) -> list[str]:
    """The checkpoint's model files: the head file at ``path``, and for scope vlm-top the VLM layers'
    file next to it (release key names, LoRA merged). Returns the extra file names."""
    export_head(setup.policy, path, cfg.scope, setup.init, setup.head_cfg, step)
    if cfg.scope != "vlm-top":
        return []
    from alpamayo_cache.model.vlm_top import VLM_LAYERS

    top = setup.policy.vlm  # type: ignore[attr-defined]
    meta = {"first_layer": top.first, "vlm_identity": vlm_identity, "base": setup.init, "step": step}
    save_tensors(path.parent / VLM_LAYERS, top.release_state(), meta)
    return [VLM_LAYERS]


def export_head(policy: Policy, path: Path, scope: str, base: str, cfg: ModelConfig, step: int) -> None:
    """Write the released-format head file (trained groups only); LoRA adapters are merged for it."""
    lora_layers = [m for m in policy.expert.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    for m in lora_layers:
        m.merge()
    try:
        state = {}
        for key, value in policy.state_dict().items():
            key = key.replace(".base_layer.", ".")
            if "lora_" in key or not is_head_key(key) or key.split(".")[0] not in GROUPS_BY_SCOPE[scope]:
                continue
            if cfg.buffers_from_config and key.endswith(REBUILT_SUFFIX):
                continue  # rebuilt from the config, as the release does
            state[key] = value
        meta = {"model_config": cfg.to_dict(), "base": base, "scope": scope, "step": step}
        save_tensors(path, to_release_keys(state, cfg.head_key_prefix), meta)
    finally:
        for m in lora_layers:
            m.unmerge()


@dataclass
class Setup:
    """A run's resolved pieces (what ``loop.run`` steps through)."""

    policy: Policy
    head_cfg: ModelConfig
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    init: str
    described: str
    device: str
    dtype: torch.dtype


def build(
    cfg: TrainConfig,
    reader: StoreReader,
    store_cfg: ModelConfig,
    device: str,
    optimizer_name: str,
    checkpointing: bool,
) -> Setup:
    """Starting weights, scope, precision, optimizer and schedule (on ``device``)."""
    dtype = compute_dtype(device, cfg.dtype)
    init = resolve_init(cfg.init, reader)
    policy, head_cfg, described = load_head(init, cfg.attention or None)
    check_head_matches_store(head_cfg, store_cfg, described)
    from alpamayo_cache.model.vlm_top import attach

    policy = attach(policy, init, reader.info, store_cfg)  # k-stores: layers k.. recompute their K/V
    params = apply_scope(policy, cfg)
    full = cfg.scope == "all" or (cfg.scope == "vlm-top" and cfg.vlm_expert == "all")
    if device.startswith("cuda") and full:
        policy.to(dtype)  # memory-lean: bf16 weights, grads and (8-bit or bf16) optimizer inputs
    elif device.startswith("cuda"):
        policy.expert.to(dtype)  # frozen (or LoRA-adapted) expert in bf16, trainables stay fp32
        if hasattr(policy, "vlm"):
            policy.vlm.to(dtype)
    policy.to(device)
    policy.gradient_checkpointing = checkpointing
    lr = cfg.lr if cfg.lr is not None else (3e-3 if head_cfg.toy else 5e-5)
    groups: list = params
    if cfg.scope == "vlm-top" and cfg.vlm_lr_scale != 1.0:
        vlm_ids = {id(p) for p in policy.vlm.parameters()}  # type: ignore[union-attr]
        groups = [
            {"params": [p for p in params if id(p) not in vlm_ids]},
            {"params": [p for p in params if id(p) in vlm_ids], "lr": lr * cfg.vlm_lr_scale},
        ]
    optimizer = make_optimizer(groups, optimizer_name, lr, cfg.weight_decay, cfg.betas)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, lr, lr * cfg.min_lr_ratio)
    return Setup(policy, head_cfg, params, optimizer, scheduler, init, described, device, dtype)


def choose_device(cfg: TrainConfig) -> tuple[str, str, bool]:
    """(device, optimizer, gradient checkpointing) the run will use."""
    device = resolve_device(cfg.device)
    checkpointing = cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.startswith("cuda"))
    return device, resolve_optimizer(cfg.optimizer, device), checkpointing
