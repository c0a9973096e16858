"""The ``alpamayo-cache`` command line: a thin typer shell over the stage functions.

Each command builds its frozen config from defaults, then ``--config FILE`` (JSON), then the options
given, then ``--set field=value`` overrides, and calls the same ``run(cfg)`` the tests call.
Heavy libraries are imported inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from alpamayo_cache.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune Alpamayo-R1's action expert from a cached, frozen-VLM feature store.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="JSON file of config fields (applied before options).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override any config field: --set lr=3e-4 (JSON values).")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")]


def make_config(cls: type, config_file: Path | None, sets: list[str] | None, **given: Any):
    """defaults -> config file -> given options (None = not given) -> --set overrides."""
    from alpamayo_cache.config import apply_overrides

    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"config file {config_file} does not exist")
        data = json.loads(config_file.read_text())
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UserError(f"config file {config_file}: unknown field {unknown[0]!r}")
        values.update(data)
    values.update({k: v for k, v in given.items() if v is not None and v != ()})
    for name, value in list(values.items()):
        if isinstance(value, list):
            values[name] = tuple(value)
        elif isinstance(value, str) and "Path" in str(fields[name].type) and value:
            values[name] = Path(value)
    cfg = cls(**values)
    return apply_overrides(cfg, sets or [])


def _guard(fn):
    """Run a command: one-line ``error: ...`` and exit status 2 for bad input."""
    from alpamayo_cache.runtime import init_logging

    init_logging()
    try:
        return fn()
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into (as a hub cache).")] = Path(
        "cache_store/synthetic-data"
    ),
    clips: int = 48,
    seed: int = 0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="Inject a fault: KIND=CLIP_INDEX, KIND in missing_camera, corrupt_video, short, nan_egomotion."
        ),
    ] = None,
) -> None:
    """Write the built-in synthetic PhysicalAI-AV clips (straight, left, right curves)."""

    def go():
        from alpamayo_cache.data.synthetic import FAULTS, write_dataset

        faults = {}
        for item in fault or []:
            kind, _, index = item.partition("=")
            if kind not in FAULTS or not index.isdigit():
                raise UserError(f"--fault {item!r}: use KIND=INDEX with KIND in {FAULTS}")
            faults[kind] = index
        snap = write_dataset(out, n_clips=clips, seed=seed, faults=faults)
        typer.echo(f"wrote {clips} clips to {snap}")

    _guard(go)


@app.command()
def precompute(
    data: Annotated[
        str | None, typer.Option(help="Local PhysicalAI-AV folder or hub cache, or 'synthetic'.")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Feature store to create or resume.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Preset (tiny, alpamayo-r1-10b) or local Alpamayo-R1 folder.")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Local tokenizer folder (real model).")] = None,
    prompt_mode: Annotated[str | None, typer.Option(help="traj-only | reasoning")] = None,
    keyframes: Annotated[str | None, typer.Option(help="default | max-curvature | stride:<seconds>")] = None,
    camera_set: Annotated[
        list[str] | None, typer.Option(help="default | front-only | mask:<cam>[+<cam>] (repeatable)")
    ] = None,
    clips: Annotated[Path | None, typer.Option(help="File with one clip id per line.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N clips (pilot runs).")] = None,
    val_percent: int | None = None,
    kv_dtype: Annotated[str | None, typer.Option(help="auto | bf16 | fp32 | fp8")] = None,
    device: DeviceOpt = None,
    reader: Annotated[str | None, typer.Option(help="auto | devkit | folder")] = None,
    revision: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 1: run the frozen VLM once per sample and write the feature store."""

    def go():
        from alpamayo_cache import precompute as stage

        cfg = make_config(
            stage.PrecomputeConfig, config, set_, data=data, store=store, model=model, tokenizer=tokenizer,
            prompt_mode=prompt_mode, keyframes=keyframes, camera_sets=camera_set, clips_file=clips, limit=limit,
            val_percent=val_percent, kv_dtype=kv_dtype, device=device, reader=reader, revision=revision, rank=rank,
            world_size=world_size, dry_run=dry_run or None,
        )  # fmt: skip
        stage.run(cfg)

    _guard(go)


@app.command()
def train(
    store: Annotated[Path, typer.Argument(help="Feature store written by precompute.")],
    run: Annotated[str | None, typer.Option(help="Run name: output goes to runs/<name>.")] = None,
    run_dir: Path | None = None,
    init: Annotated[
        str | None, typer.Option(help="auto | preset | released Alpamayo-R1 folder | run checkpoint")
    ] = None,
    train_scope: Annotated[
        str | None, typer.Option("--train", help="all (expert + projections) | heads | lora")
    ] = None,
    steps: int | None = None,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    optimizer: Annotated[str | None, typer.Option(help="auto | adamw | adamw8bit")] = None,
    checkpointing: Annotated[str | None, typer.Option(help="auto | on | off")] = None,
    attention: Annotated[str | None, typer.Option(help="bidirectional | causal")] = None,
    gpu_memory_gb: float | None = None,
    device: DeviceOpt = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the memory plan; refuse one that does not fit.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 2: train expert + action projections from the store (never loads the VLM)."""

    def go():
        from alpamayo_cache import train as stage

        cfg = make_config(
            stage.TrainConfig, config, set_, store=store, run_dir=run_dir or (Path("runs") / run if run else None),
            init=init, scope=train_scope, steps=steps, micro_batch=micro_batch, grad_accum=grad_accum, lr=lr,
            optimizer=optimizer, checkpointing=checkpointing, attention=attention, gpu_memory_gb=gpu_memory_gb,
            device=device, seed=seed, resume=resume or None, overwrite=overwrite or None, dry_run=dry_run or None,
        )  # fmt: skip
        stage.run(cfg)

    _guard(go)


@app.command("eval")
def evaluate(
    store: Annotated[Path, typer.Argument(help="Feature store written by precompute.")],
    baseline: Annotated[str | None, typer.Option(help="auto | preset | released Alpamayo-R1 folder")] = None,
    checkpoint: Annotated[
        list[str] | None, typer.Option(help="Run folder or head.safetensors (repeatable).")
    ] = None,
    out: Path | None = None,
    split: Annotated[str | None, typer.Option(help="val | train | all")] = None,
    num_samples: int | None = None,
    num_steps: int | None = None,
    seed: int | None = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage 3: baseline vs fine-tuned on the same cached samples and noise: metrics, plots, report."""

    def go():
        from alpamayo_cache import evaluate as stage

        cfg = make_config(
            stage.EvalConfig, config, set_, store=store, baseline=baseline, checkpoints=checkpoint, out_dir=out,
            split=split, num_samples=num_samples, num_steps=num_steps, seed=seed, device=device,
        )  # fmt: skip
        stage.run(cfg)

    _guard(go)


@app.command()
def pipeline(
    data: Annotated[str, typer.Option(help="Local PhysicalAI-AV folder or 'synthetic'.")] = "synthetic",
    model: Annotated[str, typer.Option(help="Preset or local Alpamayo-R1 folder.")] = "tiny",
    tokenizer: Path | None = None,
    name: Annotated[
        str | None, typer.Option(help="Names the store and the run (default <model>-<prompt mode>).")
    ] = None,
    prompt_mode: str = "traj-only",
    keyframes: Annotated[
        str | None, typer.Option(help="Default: stride:1 on synthetic clips, else default.")
    ] = None,
    camera_set: Annotated[list[str] | None, typer.Option(help="Camera sets to cache (repeatable).")] = None,
    limit: int | None = None,
    steps: int = 600,
    train_scope: Annotated[str, typer.Option("--train")] = "all",
    device: str = "auto",
    pilot: Annotated[
        bool, typer.Option("--pilot", help="A first run: 6 clips, one epoch of training.")
    ] = False,
) -> None:
    """precompute -> train -> eval in one command. With no options: tiny model, synthetic clips, CPU."""

    def go():
        from alpamayo_cache import pipeline as stage

        result = stage.run(
            stage.PipelineConfig(
                data=data, model=model, tokenizer=tokenizer, name=name, prompt_mode=prompt_mode, keyframes=keyframes,
                camera_sets=tuple(camera_set or ("default",)), limit=limit, steps=steps, scope=train_scope,
                device=device, pilot=pilot,
            )
        )  # fmt: skip
        typer.echo(f"report: {result['report']}")

    _guard(go)


@app.command()
def info(store: Annotated[Path, typer.Argument(help="Feature store.")]) -> None:
    """Counts per split and camera set, bytes, fingerprint."""

    def go():
        from alpamayo_cache.store.verify import summary

        typer.echo(json.dumps(summary(store), indent=2))

    _guard(go)


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="Feature store.")]) -> None:
    """Read every committed sample: checksums, shapes, finite values, no duplicates."""

    def go():
        from alpamayo_cache.store.verify import verify as run_verify

        report = run_verify(store)
        for sample_id, problem in report.problems.items():
            typer.echo(f"BAD {sample_id}: {problem}")
        typer.echo(
            f"verify: {report.checked} samples checked, {len(report.problems)} bad, "
            f"{report.staging_leftovers} uncommitted leftovers (removed by the next precompute)"
        )
        if not report.ok:
            raise typer.Exit(1)

    _guard(go)


def main() -> None:  # pragma: no cover - console entry for `python -m alpamayo_cache`
    app(sys.argv[1:])
