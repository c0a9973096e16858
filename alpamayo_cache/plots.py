"""Evaluation plots (matplotlib, headless): metric-by-curvature bars, paired deltas with intervals,
training/validation loss curves and labelled example panels (largest improvements, largest regressions,
random). ``make_all`` returns each picture with its caption for the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpamayo_cache import metrics as M

COLOURS = ["tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:olive"]


@dataclass(frozen=True)
class Figure:
    """One picture of the report. file: relative to the eval folder; kind: summary | loss | panel;
    group: the panel's selection group; note: how the panels were chosen (panels only)."""

    file: str
    caption: str
    kind: str
    group: str = ""
    note: str = ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_panel(
    path: Path, thumbs: np.ndarray, truth, predictions: dict[str, np.ndarray], title: str
) -> None:
    """Camera thumbnails on top; bird's-eye view (x forward up, y left) of history, GT and samples."""
    plt = _pyplot()
    n_cam = thumbs.shape[0]
    fig = plt.figure(figsize=(3 * max(n_cam, 2), 6.5))
    grid = fig.add_gridspec(2, max(n_cam, 2), height_ratios=[1, 2.6])
    for i in range(n_cam):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(thumbs[i])
        ax.set_axis_off()
    ax = fig.add_subplot(grid[1, :])
    hist, gt = truth.hist_xyz.numpy(), truth.fut_xyz.numpy()
    # Plot with x forward pointing up and y (left) pointing left, as seen from above.
    ax.plot(-hist[:, 1], hist[:, 0], color="0.4", lw=2, label="history")
    ax.plot(-gt[:, 1], gt[:, 0], color="black", lw=2.5, label="ground truth")
    for colour, (name, xyz) in zip(COLOURS, predictions.items(), strict=False):
        for k in range(xyz.shape[0]):
            ax.plot(
                -xyz[k, :, 1], xyz[k, :, 0], color=colour, lw=1, alpha=0.7, label=name if k == 0 else None
            )
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("-y (m, right is positive)")
    ax.set_ylabel("x forward (m)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def curvature_bars(path: Path, results: dict, metric: str = "min_ade") -> None:
    plt = _pyplot()
    models = list(results["by_curvature"])
    bins = sorted(
        {b for m in models for b in results["by_curvature"][m]}, key=["straight", "gentle", "sharp"].index
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        values = [results["by_curvature"][model].get(b, {}).get(metric, np.nan) for b in bins]
        ax.bar(np.arange(len(bins)) + i * width, values, width, label=model, color=COLOURS[i % len(COLOURS)])
    ax.set_xticks(np.arange(len(bins)) + width * (len(models) - 1) / 2)
    ax.set_xticklabels(bins)
    ax.set_ylabel(f"{metric} (m)")
    ax.set_title(f"{metric} by ground-truth curvature")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def paired_intervals(path: Path, results: dict, metric: str = M.HEADLINE) -> None:
    """Mean paired delta and its 95% interval of ``metric``, overall and per curvature bin, per model."""
    plt = _pyplot()
    names = list(results["paired"])
    keys = [metric] + [k for k in results["paired"][names[0]] if k.startswith(metric + "@")]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(keys) * len(names)))
    y = 0
    ticks, labels = [], []
    for colour, name in zip(COLOURS[1:], names, strict=False):
        for key in keys:
            d = results["paired"][name].get(key)
            if d is None:
                continue
            ci = [d["ci_low"], d["ci_high"]]
            if ci[0] is not None:
                ax.plot(ci, [y, y], color=colour, lw=2)
            ax.plot([d["mean"]], [y], "o", color=colour)
            ticks.append(y)
            labels.append(f"{name}: {key.partition('@')[2] or 'all'} ({d['n_clips']} clips)")
            y -= 1
    ax.axvline(0.0, color="0.3", lw=1, ls="--")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(f"{metric} candidate - baseline ({M.unit_of(metric)}); left of 0 = better")
    ax.set_title(f"Paired {metric} delta, 95% interval (clip-level bootstrap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def loss_curves(path: Path, logs: dict[str, list[dict]]) -> None:
    """Training loss per step (faint), its running mean, and validation loss, per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for colour, (name, records) in zip(COLOURS[1:], logs.items(), strict=False):
        steps = np.array([r["step"] for r in records if "loss" in r])
        loss = np.array([r["loss"] for r in records if "loss" in r])
        if len(loss):
            window = max(1, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps, loss, color=colour, alpha=0.25, lw=0.8)
            ax.plot(
                steps[window - 1 :],
                smooth,
                color=colour,
                lw=1.8,
                label=f"{name} train" + (f" (running mean of {window})" if window > 1 else ""),
            )
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            v = np.array(val)
            ax.plot(v[:, 0], v[:, 1], "o--", color=colour, ms=4, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (normalised units)")
    if ax.lines and max(line.get_ydata().max() for line in ax.lines) > 20 * min(
        max(line.get_ydata().min(), 1e-12) for line in ax.lines
    ):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Training and validation loss", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def choose_panels(change: np.ndarray | None, n: int, max_panels: int, seed: int) -> list[tuple[str, int]]:
    """(group, sample index) of the example panels: a third the largest improvements (most negative
    change), a third the largest regressions (most positive), the rest drawn at random (seeded) from the
    other samples; slots a group cannot fill go to the random draw. No change: all random."""
    best: list[int] = []
    worst: list[int] = []
    if change is not None:
        n_best = math.ceil(max_panels / 3)
        n_worst = math.ceil((max_panels - n_best) / 2)
        order = np.argsort(change, kind="stable")
        best = [int(i) for i in order if change[i] < 0][:n_best]
        worst = [int(i) for i in order[::-1] if change[i] > 0][:n_worst]
    rest = np.array([i for i in range(n) if i not in best and i not in worst], dtype=int)
    k = min(max_panels - len(best) - len(worst), len(rest))
    drawn = sorted(np.random.default_rng(seed).choice(rest, size=k, replace=False).tolist()) if k > 0 else []
    return (
        [("largest improvement", i) for i in best]
        + [("largest regression", i) for i in worst]
        + [("random", int(i)) for i in drawn]
    )


def _panels(
    out: Path, reader, sample_ids, truth, predictions, per_sample, bins, max_panels, seed
) -> list[Figure]:
    others = [m for m in per_sample if m != "baseline"]
    change = None
    if others:
        change = np.array(
            [
                a[M.HEADLINE] - b[M.HEADLINE]
                for a, b in zip(per_sample[others[0]], per_sample["baseline"], strict=True)
            ]
        )
    chosen = choose_panels(change, len(sample_ids), max_panels, seed)
    counts = {g: sum(1 for c, _ in chosen if c == g) for g, _ in chosen}
    if others:
        note = (
            f"Panels: the {counts.get('largest improvement', 0)} samples where {others[0]} lowers {M.HEADLINE} "
            f"the most against the baseline (largest improvements), the {counts.get('largest regression', 0)} "
            f"where it raises it the most (largest regressions), and {counts.get('random', 0)} drawn at random "
            f"(seed {seed}) from the rest."
        )
    else:
        note = f"Panels: {len(chosen)} samples drawn at random (seed {seed}); there is no model to compare."
    figures = []
    rank_in = dict.fromkeys(counts, 0)
    for rank, (group, i) in enumerate(chosen):
        rank_in[group] += 1
        label = f"{group} {rank_in[group]}/{counts[group]}"
        scores = "  ".join(f"{m}: {M.HEADLINE} {per_sample[m][i][M.HEADLINE]:.2f} m" for m in per_sample)
        delta = f" (change {change[i]:+.2f} m)" if change is not None else ""
        name = f"sample_{rank:02d}.png"
        sample_panel(
            out / name,
            reader.thumbnails(sample_ids[i]),
            truth[i],
            {m: p["xyz"][i] for m, p in predictions.items()},
            f"[{label}] {sample_ids[i]} [{bins[i]}]\n{scores}{delta}",
        )
        caption = f"{label.capitalize()}: {sample_ids[i]} ({bins[i]} bin); {scores}{delta}"
        figures.append(Figure(f"plots/{name}", caption, "panel", group, note))
    return figures


def make_all(
    out: Path,
    reader,
    sample_ids,
    truth,
    predictions,
    per_sample,
    bins,
    results,
    max_panels: int,
    seed: int = 0,
    run_folders: dict[str, Path | None] | None = None,
) -> list[Figure]:
    """Every picture of the report (under ``out``/plots), with captions."""
    from alpamayo_cache.report import training_log

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    figures = []
    for metric in ("min_ade", "ade"):
        name = f"by_curvature_{metric}.png"
        curvature_bars(folder / name, results, metric)
        figures.append(
            Figure(f"plots/{name}", f"Mean {metric} (m) per ground-truth curvature bin.", "summary")
        )
    if results["paired"]:
        paired_intervals(folder / "paired_min_ade.png", results)
        figures.append(
            Figure(
                "plots/paired_min_ade.png",
                "Paired min_ade delta (m) with 95% clip-level intervals.",
                "summary",
            )
        )
    logs = {name: training_log(f) for name, f in (run_folders or {}).items() if f is not None}
    logs = {name: records for name, records in logs.items() if records}
    if logs:
        loss_curves(folder / "loss_curves.png", logs)
        figures.append(
            Figure(
                "plots/loss_curves.png",
                "Training loss per step (faint), its running mean, and validation loss.",
                "loss",
            )
        )
    figures += _panels(folder, reader, sample_ids, truth, predictions, per_sample, bins, max_panels, seed)
    return figures
