"""precompute -> train -> eval with one set of options (the README's main command).

Defaults run everything on the built-in synthetic clips with the tiny preset on CPU: several
keyframes per clip (stride 1 s) so the tiny model has enough samples, a quarter of the clips held
out for evaluation, and a paired report of the fine-tuned head against its untrained start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpamayo_cache import evaluate, precompute, train
from alpamayo_cache.config import resolve_model
from alpamayo_cache.runtime import log


@dataclass(frozen=True)
class PipelineConfig:
    data: str = "synthetic"
    model: str = "tiny"
    tokenizer: Path | None = None
    name: str | None = None
    prompt_mode: str = "traj-only"
    keyframes: str | None = None
    camera_sets: tuple[str, ...] = ("default",)
    limit: int | None = None
    steps: int = 600
    scope: str = "all"
    device: str = "auto"
    pilot: bool = False
    stores: Path = Path("cache_store")
    runs: Path = Path("runs")


def run(cfg: PipelineConfig) -> dict:
    model = resolve_model(cfg.model)
    name = cfg.name or f"{model.name.replace(':', '-')}-{cfg.prompt_mode}"
    synthetic = cfg.data == precompute.SYNTHETIC
    store = cfg.stores / name
    run_dir = cfg.runs / name
    limit = 6 if cfg.pilot and cfg.limit is None else cfg.limit
    pre = precompute.run(
        precompute.PrecomputeConfig(
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
        )
    )
    steps = cfg.steps
    if cfg.pilot:  # one epoch over the train split
        n_train = len(train.StoreReader(store).select("train"))
        steps = max(1, -(-n_train // train.TrainConfig.micro_batch))
    init = cfg.model if Path(cfg.model).is_dir() else "auto"
    result = train.run(
        train.TrainConfig(
            store=store,
            run_dir=run_dir,
            init=init,
            steps=steps,
            scope=cfg.scope,
            device=cfg.device,
            overwrite=True,
        )
    )
    metrics = evaluate.run(
        evaluate.EvalConfig(
            store=store, baseline=init, checkpoints=(str(run_dir),), device=cfg.device, split="val"
        )
    )
    report = Path(metrics["out_dir"]) / "report.md"
    paired = metrics["paired"][run_dir.name]["min_ade"]
    log.info(
        f"pipeline: {pre.written + pre.skipped} samples cached, {result.step} steps trained; min_ade "
        f"{metrics['overall']['baseline']['min_ade']:.3f} -> {metrics['overall'][run_dir.name]['min_ade']:.3f} m "
        f"(paired delta {paired['mean']:.3f}, 95% CI [{paired['ci_low']:.3f}, {paired['ci_high']:.3f}])"
    )
    return {"store": store, "run_dir": run_dir, "report": report, "metrics": metrics}
