"""Evaluation plots (matplotlib, headless): per-sample panels and metric-by-curvature bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ["tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:olive"]


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


def make_all(
    out: Path, reader, sample_ids, truth, predictions, per_sample, bins, results, max_panels: int
) -> list[str]:
    """Curvature bars for min_ade and ade, and panels for the samples with the largest paired change."""
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    files = []
    for metric in ("min_ade", "ade"):
        name = f"by_curvature_{metric}.png"
        curvature_bars(folder / name, results, metric)
        files.append(f"plots/{name}")
    others = [m for m in per_sample if m != "baseline"]
    if others:
        change = np.array(
            [
                a["min_ade"] - b["min_ade"]
                for a, b in zip(per_sample[others[0]], per_sample["baseline"], strict=True)
            ]
        )
        order = np.argsort(change)  # biggest improvement first
    else:
        order = np.arange(len(sample_ids))
    for rank, i in enumerate(order[:max_panels]):
        sid = sample_ids[i]
        title = f"{sid} [{bins[i]}]\n" + "  ".join(
            f"{m}: minADE {per_sample[m][i]['min_ade']:.2f} m" for m in per_sample
        )
        name = f"sample_{rank:02d}.png"
        sample_panel(
            folder / name,
            reader.thumbnails(sid),
            truth[i],
            {m: p["xyz"][i] for m, p in predictions.items()},
            title,
        )
        files.append(f"plots/{name}")
    return files
