"""Stage 2: train the trajectory head (expert + action projections) from cached VLM features.

Never loads the VLM. A step: action target from the cache -> flow-matching pair -> action_in_proj ->
expert over the cached per-layer K/V -> action_out_proj -> MSE on the velocity. Resumable exactly:
weights, optimizer, schedule, data position and every RNG are saved with each checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.memory import GIB
from alpamayo_cache.memory import plan as memory_plan
from alpamayo_cache.model import flow_matching as fm
from alpamayo_cache.model.expert import TrajectoryHead
from alpamayo_cache.model.head import load_head
from alpamayo_cache.optim import cosine_with_warmup, make_optimizer, resolve_optimizer
from alpamayo_cache.runtime import autocast, compute_dtype, log, progress, resolve_device
from alpamayo_cache.store.dataset import Batch, CachedFeatures, collate, epoch_batches
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train_state import (
    TrainState,
    export_head,
    latest_checkpoint,
    load_state,
    save_checkpoint,
)

SCOPES = ("all", "heads", "lora")


@dataclass(frozen=True)
class TrainConfig:
    store: Path = Path("cache_store/tiny-traj-only")
    run_dir: Path = Path("runs/tiny-ft")
    init: str = "auto"  # auto (the store's preset) | preset | released folder | run checkpoint .safetensors
    scope: str = "all"
    lora_rank: int = 16
    lora_alpha: int = 32
    split: str = "train"
    val_split: str = "val"
    camera_sets: tuple[str, ...] = ()
    steps: int = 60
    stop_after: int | None = None  # end this invocation early (the schedule still spans `steps`)
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: 3e-3 for the tiny preset, 5e-5 for real-size experts
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    optimizer: str = "auto"
    checkpointing: str = "auto"  # auto (on for CUDA) | on | off
    attention: str = ""  # "" = the model's (bidirectional for Alpamayo-R1) | bidirectional | causal
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    val_every: int = 20
    save_every: int = 20
    val_draws: int = 4
    num_workers: int = -1  # -1: 0 on CPU, 4 on GPU
    gpu_memory_gb: float = 24.0
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise UserError(f"--train must be one of {SCOPES}, got {self.scope!r}")
        if self.steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise UserError("--steps, --micro-batch and --grad-accum must be at least 1")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]
    val_losses: list[tuple[int, float]]
    checkpoint: Path | None
    step: int


def _select(reader: StoreReader, split: str, camera_sets: tuple[str, ...]) -> list[str]:
    return reader.select(split, list(camera_sets) or None)


def check_head_matches_store(head_cfg: ModelConfig, store_cfg: ModelConfig, source: str) -> None:
    h, s = head_cfg.text, store_cfg.text
    if (h.num_layers, h.num_kv_heads, h.head_dim) != (s.num_layers, s.num_kv_heads, s.head_dim):
        raise UserError(
            f"{source} expects {h.num_layers} layers x {h.num_kv_heads} kv-heads x {h.head_dim}, the store holds "
            f"{s.num_layers} x {s.num_kv_heads} x {s.head_dim}: checkpoint of another architecture"
        )


def resolve_init(init: str, reader: StoreReader) -> str:
    if init != "auto":
        return init
    name = reader.info.model_name
    if reader.info.model_identity.startswith("preset:"):
        return name
    raise UserError(
        f"the store was made from {name}; pass --init <that Alpamayo-R1 folder> for the starting weights"
    )


def apply_scope(head: TrajectoryHead, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze what is not trained; inject LoRA adapters for scope 'lora'. Returns trainable params."""
    head.requires_grad_(False)
    head.action_in_proj.requires_grad_(True)
    head.action_out_proj.requires_grad_(True)
    if cfg.scope == "all":
        head.expert.requires_grad_(True)
    elif cfg.scope == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
            init_lora_weights=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            inject_adapter_in_model(lora, head.expert)
        for name, p in head.expert.named_parameters():
            p.requires_grad_("lora_" in name)
    return [p for p in head.parameters() if p.requires_grad]


def run(cfg: TrainConfig) -> TrainResult:
    reader = StoreReader(cfg.store)
    store_cfg = ModelConfig.from_dict(reader.info.model_config)
    train_ids = _select(reader, cfg.split, cfg.camera_sets)
    val_ids = _select(reader, cfg.val_split, cfg.camera_sets) if cfg.val_split else []
    if not train_ids:
        raise UserError(
            f"split {cfg.split!r} of {cfg.store} has no samples (camera sets {list(cfg.camera_sets) or 'all'})"
        )
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.dtype)
    optimizer_name = resolve_optimizer(cfg.optimizer, device)
    checkpointing = cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.startswith("cuda"))
    longest = max(reader.sample_infos()[s].length for s in train_ids)
    mem = memory_plan(
        store_cfg, longest, cfg.micro_batch, cfg.scope, optimizer_name, checkpointing,
        param_bytes=2 if dtype == torch.bfloat16 else 4, lora_rank=cfg.lora_rank, cuda=device.startswith("cuda"),
    )  # fmt: skip
    log.info(
        f"memory plan ({store_cfg.name}, L={longest}, micro-batch {cfg.micro_batch}, {cfg.scope}, {optimizer_name}, "
        f"checkpointing {'on' if checkpointing else 'off'}):\n{mem.table()}"
    )
    if cfg.dry_run:
        if mem.total > cfg.gpu_memory_gb * GIB:
            raise UserError(
                f"the plan needs {mem.total / GIB:.1f} GiB, more than --gpu-memory-gb {cfg.gpu_memory_gb}: "
                "use --optimizer adamw8bit, --checkpointing on, a smaller --micro-batch, or --train lora"
            )
        return TrainResult(cfg.run_dir, [], [], None, 0)

    run_dir = Path(cfg.run_dir)
    rank, world = _init_distributed(device)
    if rank == 0:
        resume_from = _prepare_run_dir(run_dir, cfg)
    _barrier(world)
    if rank != 0:
        resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    init = resolve_init(cfg.init, reader)
    head, head_cfg, described = load_head(init, cfg.attention or None)
    check_head_matches_store(head_cfg, store_cfg, described)
    params = apply_scope(head, cfg)
    if device.startswith("cuda") and cfg.scope == "all":
        head.to(dtype)  # memory-lean: bf16 weights, grads and (8-bit or bf16) optimizer inputs
    elif device.startswith("cuda"):
        head.expert.to(dtype)  # frozen (or LoRA-adapted) expert in bf16, trainables stay fp32
    head.to(device)
    head.gradient_checkpointing = checkpointing
    lr = cfg.lr if cfg.lr is not None else (3e-3 if head_cfg.name == "tiny" else 5e-5)
    optimizer = make_optimizer(params, optimizer_name, lr, cfg.weight_decay, cfg.betas)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, lr, lr * cfg.min_lr_ratio)
    state = TrainState(seed=cfg.seed, rank=rank)
    if resume_from is not None:
        load_state(resume_from, head, optimizer, scheduler, state)
        if rank == 0:
            _truncate_metrics(run_dir / "metrics.jsonl", state.step)
        log.info(f"resumed from {resume_from} at step {state.step}")
    elif rank == 0:
        _write_run_config(run_dir, cfg, store_cfg, init, described)
    model = head
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            head, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )
    log.info(
        f"training {sum(p.numel() for p in params):,} parameters ({cfg.scope}) from {described} on {device}"
    )

    train_set = CachedFeatures(cfg.store, train_ids)
    val_set = CachedFeatures(cfg.store, val_ids) if val_ids else None
    batches = _batch_stream(train_set, cfg, state, device, rank, world)
    amp = autocast(device, dtype)
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    last_ckpt = None
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, state.step + cfg.stop_after)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    head.train()
    status: dict[str, str] = {}
    for _ in progress(range(state.step, end), end - state.step, "train", unit="steps", status=status):
        t_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss, n_samples = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with amp:
                loss = training_loss(model, batch, state.noise_generator, device, dtype)
            (loss / cfg.grad_accum).backward()
            step_loss += _mean_over_ranks(loss.detach(), world) / cfg.grad_accum
            n_samples += len(batch.sample_ids) * world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        optimizer.step()
        scheduler.step()
        state.step += 1
        losses.append(step_loss)
        status["loss"] = f"{step_loss:.4f}"
        status["samples/s"] = f"{n_samples / (time.perf_counter() - t_start):.1f}"
        record = {
            "step": state.step,
            "loss": step_loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": n_samples / (time.perf_counter() - t_start),
            "epoch": state.epoch,
        }
        if device.startswith("cuda"):
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GIB
        if rank == 0 and val_set is not None and (state.step % cfg.val_every == 0 or state.step == cfg.steps):
            record["val_loss"] = validation_loss(head, val_set, cfg, device, dtype)
            val_losses.append((state.step, record["val_loss"]))
            head.train()
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if state.step % cfg.save_every == 0 or state.step == end:
            generators = _gather_generator_states(state, world)
            if rank == 0:
                last_ckpt = save_checkpoint(
                    run_dir, head, optimizer, scheduler, state, cfg.scope, init, head_cfg, generators
                )
            _barrier(world)
    if metrics is not None:
        metrics.close()
    if losses:
        log.info(
            f"trained to step {state.step}/{cfg.steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoint {last_ckpt}"
        )
    return TrainResult(run_dir, losses, val_losses, last_ckpt, state.step)


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world) under torchrun / accelerate launch (DDP: NCCL on GPUs, gloo on CPUs)."""
    from alpamayo_cache.runtime import dist_rank

    rank, world = dist_rank()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def _gather_generator_states(state: TrainState, world: int) -> list[torch.Tensor]:
    mine = state.noise_generator.get_state()
    if world == 1:
        return [mine]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def training_loss(
    head: TrajectoryHead, batch: Batch, generator: torch.Generator, device: str, dtype: torch.dtype
) -> torch.Tensor:
    prefix = batch.prefix.to(device, dtype=dtype)
    x = batch.action.to(device)
    # Noise and timesteps are drawn on the CPU from a saved generator: identical on resume and device.
    t = fm.sample_timesteps(x.shape[0], generator)
    noise = torch.randn(x.shape, generator=generator)
    pair = fm.make_pair(x, timesteps=t.to(device), noise=noise.to(device))
    pred = head(pair.noisy_x, pair.timesteps, prefix)
    return fm.loss(pair, pred)


@torch.no_grad()
def validation_loss(
    head: TrajectoryHead, dataset: CachedFeatures, cfg: TrainConfig, device: str, dtype: torch.dtype
) -> float:
    """Mean flow-matching loss over the val split with fixed noise/timesteps (comparable across steps)."""
    head.eval()
    g = torch.Generator().manual_seed(12345)
    total, count = 0.0, 0
    for idx in epoch_batches(dataset.lengths, cfg.micro_batch, seed=0, epoch=0, shuffle=False):
        batch = collate([dataset[i] for i in idx])
        for _ in range(cfg.val_draws):
            with autocast(device, dtype):
                loss = training_loss(head, batch, g, device, dtype)
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


def _batch_stream(
    dataset: CachedFeatures, cfg: TrainConfig, state: TrainState, device: str, rank: int = 0, world: int = 1
):
    """Endless batches; ``state`` (epoch, batch index) advances as batches are taken.

    With several ranks, round r of an epoch gives rank k the batch r * world + k of the epoch's
    order (ranks stay in lockstep; the epoch's last partial round is dropped)."""
    from torch.utils.data import DataLoader

    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.startswith("cuda") else 0)
    while True:
        order = epoch_batches(dataset.lengths, cfg.micro_batch, cfg.seed, state.epoch)
        rounds = len(order) // world
        if rounds == 0:
            raise UserError(
                f"{len(order)} batch(es) per epoch cannot feed {world} ranks: lower --micro-batch or use fewer GPUs"
            )
        mine = [order[r * world + rank] for r in range(rounds)]
        remaining = mine[state.batch_in_epoch :]
        loader = DataLoader(
            dataset,
            batch_sampler=remaining,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=device.startswith("cuda"),
            prefetch_factor=2 if workers else None,
        )
        for batch in loader:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the kill
    path.write_text("".join(k + "\n" for k in kept))


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> Path | None:
    existing = run_dir.exists() and any(run_dir.iterdir())
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        return ckpt
    if existing and not cfg.overwrite:
        raise UserError(
            f"run folder {run_dir} already exists: pass --resume to continue it or --overwrite to start over"
        )
    if existing:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _write_run_config(
    run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, init: str, described: str
) -> None:
    payload = {
        "train": json.loads(json.dumps(asdict(cfg), default=str)),
        "model": model_cfg.to_dict(),
        "init": init,
        "init_described": described,
    }
    (run_dir / "config.json").write_text(json.dumps(payload, indent=2))


__all__ = ["TrainConfig", "TrainResult", "run", "export_head"]
