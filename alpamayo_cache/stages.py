"""The commands: a name, the config class it reads, and the stage function it calls.

The CLI is generated from this table; the stage modules are imported only when a command runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from alpamayo_cache import configs


@dataclass(frozen=True)
class Command:
    name: str
    config: type
    run: Callable[[Any], Any]
    help: str


def _synth(cfg: configs.SynthConfig) -> None:
    from alpamayo_cache.data.synthetic import FAULTS, write_dataset
    from alpamayo_cache.errors import UserError

    faults = {}
    for item in cfg.fault:
        kind, _, index = item.partition("=")
        if kind not in FAULTS or not index.isdigit():
            raise UserError(f"--fault {item!r}: use KIND=INDEX with KIND in {FAULTS}")
        faults[kind] = index
    snap = write_dataset(cfg.out, n_clips=cfg.clips, seed=cfg.seed, faults=faults)
    typer.echo(f"wrote {cfg.clips} clips to {snap}")


def _precompute(cfg: configs.PrecomputeConfig) -> None:
    from alpamayo_cache import precompute

    precompute.run(cfg)


def _train(cfg: configs.TrainConfig) -> None:
    from alpamayo_cache import train

    train.run(cfg)


def _eval(cfg: configs.EvalConfig) -> None:
    from alpamayo_cache import evaluate

    evaluate.run(cfg)


def _pipeline(cfg: configs.PipelineConfig) -> None:
    from alpamayo_cache import pipeline

    result = pipeline.run(cfg)
    typer.echo(f"report: {result['report']}")


def _export(cfg: configs.ExportConfig) -> None:
    from alpamayo_cache import export

    typer.echo(f"exported to {export.run(cfg)}")


def _info(cfg: configs.StoreConfig) -> None:
    from alpamayo_cache.store.verify import summary

    typer.echo(json.dumps(summary(cfg.store), indent=2))


def _verify(cfg: configs.StoreConfig) -> None:
    from alpamayo_cache.store.verify import print_report, verify

    report = verify(cfg.store)
    print_report(report, cfg.store)
    if not report.ok:
        raise typer.Exit(1)


def _repair(cfg: configs.StoreConfig) -> None:
    from alpamayo_cache.store.verify import repair

    repair(cfg.store)


COMMANDS: tuple[Command, ...] = (
    Command("synth", configs.SynthConfig, _synth, "Write the built-in synthetic PhysicalAI-AV clips."),
    Command(
        "precompute",
        configs.PrecomputeConfig,
        _precompute,
        "Stage 1: run the frozen VLM once per sample and write the feature store.",
    ),
    Command(
        "train",
        configs.TrainConfig,
        _train,
        "Stage 2: train expert + action projections from the store (never loads the VLM).",
    ),
    Command(
        "eval",
        configs.EvalConfig,
        _eval,
        "Stage 3: baseline vs fine-tuned on the same cached samples and noise: metrics, plots, report.",
    ),
    Command(
        "pipeline",
        configs.PipelineConfig,
        _pipeline,
        "precompute -> train -> eval in one command. With no options: tiny model, synthetic clips, CPU.",
    ),
    Command(
        "export",
        configs.ExportConfig,
        _export,
        "Write a training run as a complete Alpamayo-R1 checkpoint folder (index + shards, release key names).",
    ),
    Command("info", configs.StoreConfig, _info, "Counts per split and camera set, bytes, fingerprint."),
    Command(
        "verify",
        configs.StoreConfig,
        _verify,
        "Read every committed sample: checksums, shapes, finite values, no duplicates.",
    ),
    Command(
        "repair",
        configs.StoreConfig,
        _repair,
        "Move damaged samples into quarantine/ so the next precompute makes exactly them again.",
    ),
)
