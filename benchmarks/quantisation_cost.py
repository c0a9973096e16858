"""What K/V quantisation costs downstream: the same samples, seeds and steps, trained and evaluated from
bf16, fp8, int8 and int4 stores; minADE and loss deltas vs bf16.

The samples are the default pipeline's (tiny preset, the 48 built-in synthetic clips, keyframes every 1 s,
a quarter of the clips held out), precomputed once on CPU in fp32 (the VLM's exact output) and re-encoded
into each dtype with ``store.transcode`` (byte for byte what ``precompute --kv-dtype X`` writes from the
same K/V). Each dtype then trains a run with the pipeline's settings and seed, and is evaluated on the
validation split of its own store (best-of-6, 10 Euler steps, the same per-sample noise for every model).
"eval only" evaluates the bf16-trained run on each store: the cost of quantised K/V at inference alone.
One evaluation per store covers its own run, the bf16 run and the untrained baseline (``--keep`` reuses
finished runs and evaluations, so an interrupted benchmark continues where it stopped).

    python benchmarks/quantisation_cost.py                         # ~10-20 min on a 2-core CPU
    python benchmarks/quantisation_cost.py --steps 200 --dir /tmp/qcost --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from alpamayo_cache import evaluate, precompute, train
from alpamayo_cache.configs import EvalConfig, PrecomputeConfig, TrainConfig
from alpamayo_cache.store import format as F
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.store.transcode import transcode

DTYPES = ("bf16", "fp8", "int8", "int4")


def source_store(folder: Path, clips: int) -> Path:
    """The default pipeline's samples in fp32 (made once; reused by --keep)."""
    store = folder / "fp32"
    precompute.run(
        PrecomputeConfig(
            store=store, data="synthetic", model="tiny", keyframes="stride:1", val_percent=25,
            device="cpu", kv_dtype="fp32", synthetic_clips=clips, synthetic_dir=folder / "synthetic-data",
        )
    )  # fmt: skip
    return store


def kv_megabytes(store: Path) -> float:
    """K/V bytes (codes and scales) per sample on disk, in MB."""
    names = (F.KV, F.KV_SCALE, F.K_QUANT, F.V_QUANT)
    samples = list((store / F.SAMPLES_DIR).iterdir())
    total = sum(
        p.stat().st_size for s in samples for n in names if (s / n).is_dir() for p in (s / n).iterdir()
    )
    return total / len(samples) / 1e6


def min_ades(store: Path, run_dirs: list[Path], out: Path) -> dict[str, float]:
    """minADE of each run (and the untrained baseline) on ``store``'s validation split; reuses a finished
    evaluation in ``out`` (--keep)."""
    if not (out / "metrics.json").is_file():
        checkpoints = tuple(str(r) for r in run_dirs)
        evaluate.run(EvalConfig(store=store, checkpoints=checkpoints, out_dir=out, device="cpu", plots=False))
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    return {name: float(value["min_ade"]) for name, value in overall.items()}


def trained(store: Path, run_dir: Path, steps: int, seed: int) -> list[dict]:
    """The run's metrics lines, training it first unless a finished run is there (--keep)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    if len(lines) != steps:
        shutil.rmtree(run_dir, ignore_errors=True)
        train.run(TrainConfig(store=store, run_dir=run_dir, steps=steps, seed=seed, device="cpu"))
        lines = metrics.read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (the pipeline's default)")
    parser.add_argument("--clips", type=int, default=48, help="synthetic clips (the pipeline's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep stores and runs")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="quantisation_cost-"))
    try:
        src = source_store(base, args.clips)
        reader = StoreReader(src)
        n_train, n_val = len(reader.select("train")), len(reader.select("val"))
        rows = {}
        for kv_dtype in DTYPES:
            store = base / kv_dtype
            if not (store / "zarr.json").exists():
                transcode(src, store, kv_dtype)
            run_dir = base / "runs" / kv_dtype
            lines = trained(store, run_dir, args.steps, args.seed)
            reference = base / "runs" / "bf16"  # trained first
            runs = [run_dir] if run_dir == reference else [run_dir, reference]
            ades = min_ades(store, runs, base / "eval" / kv_dtype)
            rows[kv_dtype] = {
                "mb": kv_megabytes(store),
                "final_loss": statistics.mean(
                    r["loss"] for r in lines[-20:]
                ),  # last 20 steps: less batch noise
                "val_loss": lines[-1].get("val_loss", float("nan")),
                "min_ade": ades[kv_dtype],
                "eval_only": ades["bf16"],
                "baseline": ades["baseline"],
            }
        print(
            f"tiny preset, {n_train} train / {n_val} val samples ({args.clips} synthetic clips, stride 1 s), "
            f"{args.steps} steps, seed {args.seed}, CPU fp32 compute; deltas vs bf16"
        )
        print("| K/V | MB/sample | final loss (mean of last 20) | delta | val loss | delta | minADE (m) | delta "
              "| eval only: bf16 run on this store, minADE | delta | untrained baseline minADE |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        ref = rows["bf16"]
        for kv_dtype, r in rows.items():
            print(
                f"| {kv_dtype} | {r['mb']:.3f} | {r['final_loss']:.4f} | {r['final_loss'] - ref['final_loss']:+.4f} "
                f"| {r['val_loss']:.4f} | {r['val_loss'] - ref['val_loss']:+.4f} | {r['min_ade']:.3f} "
                f"| {r['min_ade'] - ref['min_ade']:+.3f} | {r['eval_only']:.3f} | {r['eval_only'] - ref['eval_only']:+.3f} "
                f"| {r['baseline']:.3f} |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
