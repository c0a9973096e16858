"""Stage 2: train the trajectory policy (expert + action projections) from cached VLM features.

Never loads the VLM. A step: cached prefix + action target -> flow-matching draws -> policy loss ->
backward -> optimizer. Resumable exactly: weights, optimizer, schedule, data position and RNG are saved
with each checkpoint, and each micro-batch's noise is seeded by its place in the epoch, so a resumed
run, or the same global batch split over ranks (accelerate / torchrun), computes the same steps.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.guidance import route_generator, training_prefix
from alpamayo_cache.runtime import log, progress
from alpamayo_cache.store.dataset import CachedFeatures
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train import checkpoints as C
from alpamayo_cache.train import tracking
from alpamayo_cache.train.feed import batch_stream, noise_generator
from alpamayo_cache.train.objectives import check_store, make_objective
from alpamayo_cache.train.plan import GIB, plan_for
from alpamayo_cache.train.setup import (
    Setup,
    build,
    check_init,
    choose_device,
    export_checkpoint,
    select_samples,
)
from alpamayo_cache.train.throughput import throughput
from alpamayo_cache.train.validation import validation_loss


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]
    val_losses: list[tuple[int, float]]
    checkpoint: Path | None
    step: int
    data_wait_share: float = 0.0
    extra: dict = field(default_factory=dict)


class StopRequest:
    """First Ctrl-C: finish the step, save, exit 130; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step: saving a checkpoint (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def plan_check(
    cfg: TrainConfig,
    reader: StoreReader,
    store_cfg: ModelConfig,
    train_ids: list[str],
    device: str,
    optimizer: str,
    checkpointing: bool,
):
    longest = max(reader.sample_info(s).length for s in train_ids)
    rate = throughput(cfg, store_cfg, reader.sample_dir(train_ids[0]), device)
    plan = plan_for(
        cfg, store_cfg, longest, device, optimizer, checkpointing, reader.info.kv_dtype, rate,
        reader.info.vlm_from_layer,
    )  # fmt: skip
    log.info(plan.describe(cfg.gpu_memory_gb))
    if cfg.dry_run and plan.memory.total > cfg.gpu_memory_gb * GIB:
        raise UserError(
            f"the plan needs {plan.memory.total / GIB:.1f} GiB, more than --gpu-memory-gb {cfg.gpu_memory_gb}: "
            "use --optimizer adamw8bit, --checkpointing on, a smaller --micro-batch, or --train lora"
        )
    return plan


def run(cfg: TrainConfig) -> TrainResult:
    run_dir = cfg.output_dir
    if cfg.dry_run and cfg.model:  # plan from a preset: no store needed (e.g. Alpamayo 2 Super)
        from alpamayo_cache.train.preset_plan import preset_plan

        preset_plan(cfg)
        return TrainResult(run_dir, [], [], None, 0)
    reader = StoreReader(cfg.store)
    log.info(f"train: {cfg.store} -> {run_dir} ({cfg.scope}, {cfg.steps} steps)")
    store_cfg = ModelConfig.from_dict(reader.info.model_config)
    train_ids, val_ids = select_samples(reader, cfg)
    check_init(cfg, reader, store_cfg)
    check_store(cfg, reader)
    device, optimizer_name, checkpointing = choose_device(cfg)
    plan = plan_check(cfg, reader, store_cfg, train_ids, device, optimizer_name, checkpointing)
    if cfg.dry_run:
        return TrainResult(run_dir, [], [], None, 0)
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="bf16" if device.startswith("cuda") else "no",
        **tracking.accelerator_kwargs(cfg.trackers, run_dir),
    )
    rank = accelerator.process_index
    lock, resume_from = C.open_run(run_dir, cfg) if rank == 0 else (None, None)
    try:
        accelerator.wait_for_everyone()
        if rank != 0 and cfg.resume:
            resume_from = C.latest_checkpoint(run_dir)
        setup = build(cfg, reader, store_cfg, str(accelerator.device), optimizer_name, checkpointing)
        return _train(
            cfg,
            accelerator,
            setup,
            reader,
            store_cfg,
            train_ids,
            val_ids,
            run_dir,
            resume_from,
            plan.prefetch,
        )
    except BaseException:
        if lock is not None and not cfg.resume:
            C.discard_if_empty(run_dir)  # a fresh run that failed before its first checkpoint leaves nothing
        raise
    finally:
        if lock is not None:
            lock.release()


def _resume_or_start(
    cfg: TrainConfig,
    setup: Setup,
    run_dir: Path,
    resume_from: Path | None,
    store_cfg: ModelConfig,
    rank: int,
    world: int,
) -> C.TrainState:
    state = C.TrainState()
    if resume_from is None:
        if rank == 0:
            C.write_config(run_dir, cfg, store_cfg, setup.init, setup.described)
        return state
    if rank == 0:
        C.check_resume_settings(run_dir, cfg)
    C.load(resume_from, setup.policy, setup.optimizer, setup.scheduler, state, world)
    if rank == 0:
        C.truncate_metrics(run_dir / "metrics.jsonl", state.step)
    log.info(f"resumed from {resume_from} at step {state.step}")
    return state


def _train(
    cfg, accelerator, setup: Setup, reader, store_cfg, train_ids, val_ids, run_dir, resume_from, prefetch
) -> TrainResult:
    rank, world = accelerator.process_index, accelerator.num_processes
    state = _resume_or_start(cfg, setup, run_dir, resume_from, store_cfg, rank, world)
    tracking.start(accelerator, cfg, state.step)
    model, optimizer = accelerator.prepare(setup.policy, setup.optimizer)
    log.info(
        f"training {sum(p.numel() for p in setup.params):,} parameters ({cfg.scope}) from {setup.described} on {setup.device}"
    )
    objective = make_objective(cfg)
    front = getattr(objective, "reads_front", False)  # the rewards' images: read only when needed
    dataset = CachedFeatures(cfg.store, train_ids, reader, front=front)
    val_set = CachedFeatures(cfg.store, val_ids, reader) if (val_ids and rank == 0) else None
    batches = batch_stream(dataset, cfg, state, rank, world, setup.device, prefetch)
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    result = TrainResult(run_dir, [], [], None, state.step)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, state.step + cfg.stop_after)
    if setup.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(setup.device)
    setup.policy.train()
    status: dict[str, str] = {}
    wall = waited = 0.0
    last_val: float | None = None
    with StopRequest() as stop, batches:  # closing the feed stops its reader thread
        for _ in progress(range(state.step, end), end - state.step, "train", unit="steps", status=status):
            record = _step(cfg, accelerator, model, optimizer, setup, objective, batches, world)
            state.step += 1
            wall += record["step_s"]
            waited += record["data_wait_s"]
            result.losses.append(record["loss"])
            status["loss"] = f"{record['loss']:.4f}"
            record.update(step=state.step, lr=setup.scheduler.get_last_lr()[0], epoch=state.epoch)
            if setup.device.startswith("cuda"):
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(setup.device) / GIB
            if val_set is not None and (state.step % cfg.val_every == 0 or state.step == cfg.steps):
                last_val = record["val_loss"] = _validate(cfg, setup, val_set)
                result.val_losses.append((state.step, last_val))
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            tracking.log(accelerator, record)
            stopping = _agree(accelerator, stop.requested)
            if state.step % cfg.save_every == 0 or state.step == end or stopping:
                result.checkpoint = _save(cfg, accelerator, setup, state, run_dir, last_val)
            if stopping:
                break
    if metrics is not None:
        metrics.close()
    accelerator.end_training()
    result.step = state.step
    result.data_wait_share = waited / wall if wall else 0.0
    _report(cfg, result)
    if stop.requested:
        # The command on a line of its own, unwrapped, so it can be copied as it stands.
        log.warning(f"interrupted at step {state.step}; continue with the command below")
        print(C.resume_command(cfg, run_dir), file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return result


def _validate(cfg: TrainConfig, setup: Setup, val_set: CachedFeatures) -> float:
    loss = validation_loss(setup.policy, val_set, cfg, setup.device, setup.dtype)
    setup.policy.train()
    return loss


def _report(cfg: TrainConfig, result: TrainResult) -> None:
    if result.losses:
        log.info(
            f"trained to step {result.step}/{cfg.steps}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
            f"waiting for data {100 * result.data_wait_share:.0f}% of the time; checkpoint {result.checkpoint}"
        )


def _agree(accelerator, flag: bool) -> bool:
    """Every rank stops together if any was asked to."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


def _step(
    cfg: TrainConfig, accelerator, model, optimizer, setup: Setup, objective, batches, world: int
) -> dict:
    t_start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    step_loss, n_samples, waited = 0.0, 0, 0.0
    extras: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        t_wait = time.perf_counter()
        epoch, index, batch = next(batches)
        # Routed samples go without their route at rate --route-dropout (guided and unguided velocity).
        route_draws = route_generator(cfg.seed, epoch, index)
        prefix = training_prefix(batch, cfg.route_dropout, route_draws).to(setup.device)
        waited += time.perf_counter() - t_wait
        if not prefix.all_finite():
            raise UserError(
                f"non-finite features (NaN/Inf) in sample(s) {', '.join(batch.sample_ids)} of {cfg.store}: "
                "the store is damaged; run `alpamayo-cache verify` and `repair`, then precompute again"
            )
        generator = noise_generator(cfg.seed, epoch, index)
        sync = micro == cfg.grad_accum - 1
        with accelerator.no_sync(model) if not sync else nullcontext(), accelerator.autocast():
            loss, extra = objective.loss(model, prefix, batch, generator, setup.device)
            accelerator.backward(loss / cfg.grad_accum)
        step_loss += accelerator.reduce(loss.detach(), "mean").item() / cfg.grad_accum
        for key, value in extra.items():
            extras[key] = extras.get(key, 0.0) + value / cfg.grad_accum
        n_samples += len(batch.sample_ids) * world
    grad_norm = accelerator.clip_grad_norm_(setup.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
    optimizer.step()
    setup.scheduler.step()
    elapsed = time.perf_counter() - t_start
    return {
        "loss": step_loss,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "samples_per_s": n_samples / elapsed,
        "step_s": elapsed,
        "data_wait_s": waited,
        **extras,
    }


def _save(
    cfg: TrainConfig, accelerator, setup: Setup, state: C.TrainState, run_dir: Path, val_loss: float | None
) -> Path | None:
    folder = None
    if accelerator.is_main_process:

        def export(path: Path) -> list[str]:
            return export_checkpoint(setup, cfg, path, state.step, StoreReader(cfg.store).info.model_identity)

        folder = C.save(
            run_dir,
            setup.policy,
            setup.optimizer,
            setup.scheduler,
            state,
            export,
            accelerator.num_processes,
            val_loss,
            cfg.keep_checkpoints,
        )
    accelerator.wait_for_everyone()
    return folder


__all__ = ["TrainConfig", "TrainResult", "run"]
