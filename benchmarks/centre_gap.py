"""Does co-training the VLM's top layers move the centre of the predicted trajectories where expert-only
training does not? The default synthetic data (tiny preset, 48 clips, keyframes every 1 s, a quarter of the
clips held out), stored once with ``--vlm-from-layer 1`` (the tiny preset's only valid k); two runs of
the same steps, seed and learning rate: expert-only (``--train all``) and ``--train vlm-top`` (LoRA on
the layer above k, plus the expert); one evaluation of both against the untrained baseline on the
validation split (best-of-6, the same noise for every model).

Printed per model: min_ade, centre_ade (ADE of the mean of the 6 samples) and centre_gap = centre_ade -
min_ade (m), and the paired deltas of centre_ade against the baseline with their clip-level intervals.

    python benchmarks/centre_gap.py                  # ~10 min on a 2-core CPU
    python benchmarks/centre_gap.py --steps 200 --dir /tmp/gap --keep
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from alpamayo_cache import evaluate, precompute, train
from alpamayo_cache.configs import EvalConfig, PrecomputeConfig, TrainConfig

METRICS = ("min_ade", "centre_ade", "centre_gap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps (the pipeline's default)")
    parser.add_argument("--clips", type=int, default=48, help="synthetic clips (the pipeline's default)")
    parser.add_argument(
        "--vlm-lr-scale", type=float, default=3.0, help="learning-rate factor of the VLM layers"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store and runs")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="centre-gap-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store-k1"
    try:
        precompute.run(
            PrecomputeConfig(
                store=store, model="tiny", keyframes="stride:1", val_percent=25, vlm_from_layer=1, device="cpu",
                synthetic_clips=args.clips, synthetic_dir=work / "synthetic", seed=args.seed,
            )
        )  # fmt: skip
        runs = {}
        for name, scope in (("expert-only", "all"), ("vlm-top", "vlm-top")):
            runs[name] = work / name
            if not (runs[name] / "checkpoints").is_dir():
                train.run(
                    TrainConfig(
                        store=store, run_dir=runs[name], scope=scope, steps=args.steps, device="cpu",
                        seed=args.seed, vlm_lr_scale=args.vlm_lr_scale,
                    )
                )  # fmt: skip
        results = evaluate.run(
            EvalConfig(
                store=store, checkpoints=tuple(str(p) for p in runs.values()), device="cpu", plots=False,
                out_dir=work / "eval", seed=args.seed,
            )
        )  # fmt: skip
        print(f"\n{'model':<12}" + "".join(f"{m:>12}" for m in METRICS) + "   (m, validation split)")
        for model, row in results["overall"].items():
            print(f"{model:<12}" + "".join(f"{row[m]:>12.3f}" for m in METRICS))
        for model in runs:
            d = results["paired"][model]["centre_ade"]
            ci = "n/a" if d.get("ci_low") is None else f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            print(f"centre_ade delta vs baseline, {model}: {d['mean']:+.3f} m, 95% CI {ci}")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
