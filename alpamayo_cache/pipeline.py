"""precompute -> train -> eval with one set of options (the README's main command).

Defaults run everything on the built-in synthetic clips with the tiny preset on CPU: several
keyframes per clip (stride 1 s) so the tiny model has enough samples, a quarter of the clips held
out for evaluation, and a paired report of the fine-tuned policy against its untrained start.
A pilot (``--pilot``) is named ``<model>-<prompt mode>-pilot`` unless ``--name`` says otherwise, so it
never replaces the default run's store or checkpoints. A model that reads a route (1.5, 2 Super) gets
the synthetic clips' routes on synthetic data, trains with route dropout, and is evaluated with guidance.
"""

from __future__ import annotations

from pathlib import Path

from alpamayo_cache import evaluate, precompute, train
from alpamayo_cache.config import resolve_model
from alpamayo_cache.configs import EvalConfig, PipelineConfig, PrecomputeConfig, TrainConfig
from alpamayo_cache.runtime import log
from alpamayo_cache.store.reader import StoreReader

__all__ = ["PipelineConfig", "run"]


def run(cfg: PipelineConfig) -> dict:
    model = resolve_model(cfg.model)
    name = cfg.name or f"{model.name.replace(':', '-')}-{cfg.prompt_mode}" + ("-pilot" if cfg.pilot else "")
    synthetic = cfg.data == precompute.SYNTHETIC
    store = cfg.stores / name
    run_dir = cfg.runs / name
    log.info(f"pipeline: store {store}, run {run_dir}, report {run_dir / 'eval' / 'report.md'}")
    limit = 6 if cfg.pilot and cfg.limit is None else cfg.limit
    route = cfg.route
    if route == "auto":
        route = precompute.SYNTHETIC if synthetic and model.route != "none" else ""
    pre = precompute.run(
        PrecomputeConfig(
            store=store,
            data=cfg.data,
            model=cfg.model,
            tokenizer=cfg.tokenizer,
            prompt_mode=cfg.prompt_mode,
            keyframes=cfg.keyframes or ("stride:1" if synthetic else "default"),
            camera_sets=cfg.camera_sets,
            limit=limit,
            val_percent=25 if synthetic else 10,
            device=cfg.device,
            synthetic_dir=cfg.stores / "synthetic-data",
            synthetic_clips=cfg.synthetic_clips,
            route=route,
        )
    )
    steps = cfg.steps
    micro_batch = TrainConfig.micro_batch
    if cfg.pilot:  # one epoch over the train split
        n_train = len(StoreReader(store).select("train"))
        steps = max(1, -(-n_train // micro_batch))
    init = cfg.model if Path(cfg.model).is_dir() else "auto"
    result = train.run(
        TrainConfig(
            store=store, run_dir=run_dir, init=init, steps=steps, scope=cfg.scope, device=cfg.device,
            overwrite=(run_dir / ".alpamayo-cache-run").is_file(), route_dropout=cfg.route_dropout if route else 0.0,
        )
    )  # fmt: skip
    reader = StoreReader(store)
    routed_val = any(reader.sample_info(s).has_route for s in reader.select("val"))
    guidance = cfg.guidance if cfg.guidance is not None else (1.5 if routed_val else None)
    metrics = evaluate.run(
        EvalConfig(
            store=store, baseline=init, checkpoints=(str(run_dir),), device=cfg.device, split="val",
            guidance=guidance,
        )
    )  # fmt: skip
    report = Path(metrics["out_dir"]) / "report.md"
    paired = metrics["paired"][run_dir.name]["min_ade"]
    interval = (
        f"95% CI [{paired['ci_low']:.3f}, {paired['ci_high']:.3f}]"
        if paired.get("ci_low") is not None
        else "no interval: too few validation clips"
    )
    log.info(
        f"pipeline: {pre.written + pre.skipped} samples cached, {result.step} steps trained; min_ade "
        f"{metrics['overall']['baseline']['min_ade']:.3f} -> {metrics['overall'][run_dir.name]['min_ade']:.3f} m "
        f"(paired delta {paired['mean']:.3f}, {interval})"
    )
    return {"store": store, "run_dir": run_dir, "report": report, "metrics": metrics}
