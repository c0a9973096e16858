"""report.md: the comparison a reader needs, conventions first, then numbers, then pictures."""

from __future__ import annotations

import math
from pathlib import Path

from alpamayo_cache.metrics import KEY_METRICS


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def write(path: Path, results: dict, plot_files: list[str]) -> None:
    lines = ["# alpamayo-cache evaluation", ""]
    lines += [
        f"Store: `{results['store']['path']}` (fingerprint `{results['store']['fingerprint']}`, prompt {results['store']['prompt_mode']})",
        "",
    ]
    lines += (
        ["## Models", ""] + [f"- **{name}**: `{spec}`" for name, spec in results["models"].items()] + [""]
    )
    lines += ["## Conventions", ""] + [f"- {k}: {v}" for k, v in results["conventions"].items()] + [""]
    models = list(results["overall"])
    metrics = [*KEY_METRICS, "turns_predicted_straight_share"]
    lines += ["## Overall", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for m in metrics:
        lines.append(
            f"| {m} | " + " | ".join(_fmt(results["overall"][name].get(m)) for name in models) + " |"
        )
    n = results["overall"][models[0]].get("n", 0)
    lines += ["", f"{int(n)} samples.", ""]
    lines += [
        "## By ground-truth curvature (min_ade, m)",
        "",
        "| bin | n | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    bins = sorted(results["by_curvature"][models[0]], key=["straight", "gentle", "sharp"].index)
    for b in bins:
        count = int(results["by_curvature"][models[0]][b].get("n", 0))
        lines.append(
            f"| {b} | {count} | "
            + " | ".join(_fmt(results["by_curvature"][m][b].get("min_ade")) for m in models)
            + " |"
        )
    lines.append("")
    if results["by_camera_set"]:
        lines += [
            "## By camera set (min_ade, m)",
            "",
            "| camera set | " + " | ".join(models) + " |",
            "|---|" + "---|" * len(models),
        ]
        sets = sorted(results["by_camera_set"][models[0]])
        for c in sets:
            lines.append(
                f"| {c} | "
                + " | ".join(_fmt(results["by_camera_set"][m][c].get("min_ade")) for m in models)
                + " |"
            )
        lines.append("")
    for name, paired in results["paired"].items():
        lines += [f"## Paired: {name} - baseline", "", "Negative = the fine-tuned model is better.", ""]
        lines += ["| metric | mean delta | 95% CI | win rate | n |", "|---|---|---|---|---|"]
        for key, d in paired.items():
            lines.append(
                f"| {key} | {_fmt(d['mean'])} | [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] | {_fmt(d['win_rate'])} | {d['n']} |"
            )
        lines.append("")
    if plot_files:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plot_files] + [""]
    path.write_text("\n".join(lines))
