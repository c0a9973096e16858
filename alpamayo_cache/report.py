"""The evaluation report: verdicts first, then provenance, regressions, conventions, tables, pictures.

``build`` turns ``metrics.summarise``'s results (plus ``provenance``) into a list of blocks, the one
source of both ``report.md`` and the self-contained ``report.html`` (``report_html``). Blocks are tuples:
("h", level, text), ("p", text), ("ul", [items]), ("table", header, rows), ("img", file, caption);
text may use **bold** and `code`. Every number carries its unit (m, deg, share).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alpamayo_cache import metrics as M
from alpamayo_cache import reward_metrics as RM

METRIC_TEXT = {
    "min_ade": "best-of-{k} XY ADE over 6.4 s",
    "min_ade/by_t=3.0": "ADE over the first 3 s of the best-of-{k} sample",
    "ade": "sample-0 XY ADE over 6.4 s",
    "min_fde": "best-of-{k} final-point error at 6.4 s",
    "corner_distance": "4x3x2 m box-corner distance, min over {k}",
    "lateral_error_6.4s": "lateral error of the mean of {k} at 6.4 s",
    "heading_error_deg": "heading error of the mean of {k} at 6.4 s",
    M.TURN_SHARE: "share of ground-truth turns predicted straight",
}
PANEL_GROUPS = ("largest improvement", "largest regression", "random")


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def interval(d: dict, unit: str, prefix: str = "ci", signed: bool = True) -> str:
    """The interval of ``d``'s ``<prefix>_low``/``<prefix>_high`` as [low, high] unit, or why there is none."""
    low, high = d.get(f"{prefix}_low"), d.get(f"{prefix}_high")
    if low is None:
        return f"(no interval: fewer than {M.MIN_CLIPS} clips)"
    return f"[{fmt(low, signed)}, {fmt(high, signed)}] {unit}".rstrip()


def verdict_sentence(name: str, v: dict, split: str, k: int) -> str:
    """The first-line verdict of one compared model on the headline metric."""
    unit = M.unit_of(v["metric"])
    what = f"{v['metric']} ({METRIC_TEXT.get(v['metric'], v['metric']).format(k=k)}, split {split})"
    lead = {
        M.BETTER: f"**{name} is better than the baseline** on {what}",
        M.WORSE: f"**{name} is worse than the baseline** on {what}",
        M.NO_DIFFERENCE: f"**{name}: no significant difference from the baseline** on {what}",
    }[v["verdict"]]
    return (
        f"{lead}: mean paired delta {fmt(v['mean'], True)} {unit}, 95% CI {interval(v, unit)} "
        f"(clip-level bootstrap over {v['n_clips']} clips, {v['n']} samples; negative = better)."
    )


def _verdicts(results: dict) -> list[tuple]:
    split, k = results.get("config", {}).get("split", "?"), _k(results)
    if not results["verdicts"]:
        return [("p", "Only the baseline was evaluated: no comparison, so no verdict.")]
    out = []
    for name, v in results["verdicts"].items():
        regs = results["regressions"].get(name, [])
        tail = f" {len(regs)} significant regression(s): see Regressions." if regs else " No regressions."
        out.append(("p", verdict_sentence(name, v, split, k) + tail))
    return out


def _k(results: dict) -> int:
    return int(results.get("config", {}).get("num_samples", 6))


def _provenance(results: dict) -> list[tuple]:
    p = results.get("provenance")
    if not p:
        return []
    items = [f"Baseline weights: {p['baseline']}"]
    items += [f"Compared **{name}**: {text}" for name, text in p["compared"].items()]
    items += [f"Data: {d}" for d in p["data"]]
    store = p["store"]
    items += [
        f"VLM features: {store['vlm']}",
        f"Store: `{store['path']}`, fingerprint `{store['fingerprint']}`, layout v{store['layout_version']}, "
        f"K/V dtype {store['kv_dtype']}, VLM compute dtype {store['compute_dtype']}, prompt mode {store['prompt_mode']}",
        f"Evaluated: split {p['split']}, {p['samples']} samples from {p['clips']} clips, "
        f"camera sets {', '.join(p['camera_sets'])}",
        "Seeds: " + ", ".join(f"{k} {v}" for k, v in p["seeds"].items()),
    ]
    if store.get("software"):
        items.append("Software at precompute: " + ", ".join(f"{k} {v}" for k, v in store["software"].items()))
    return [("h", 2, "Provenance"), ("ul", items)]


def _regressions(results: dict) -> list[tuple]:
    blocks: list[tuple] = [("h", 2, "Regressions")]
    if not results["regressions"]:
        return [*blocks, ("p", "No compared model: nothing to regress.")]
    items = []
    for name, regs in results["regressions"].items():
        for r in regs:
            items.append(
                f"**{name}**, {r['metric']} {where(r['bin'])} ({r['n']} samples, {r['n_clips']} clips): "
                f"{fmt(r['mean'], True)} {r['unit']}, 95% CI {interval(r, r['unit'])}"
            )
    if not items:
        return [*blocks, ("p", "None: no metric or bin has its 95% interval entirely on the worse side.")]
    note = "Every metric and curvature bin whose 95% interval of the paired delta lies entirely above zero:"
    return [*blocks, ("p", note), ("ul", items)]


def where(group: str) -> str:
    return "over all samples" if group == "all" else f"on the {group} bin"


def _overall(results: dict) -> list[tuple]:
    models = list(results["overall"])
    header = ["metric", "unit", *models]
    rows = []
    for m in (*M.KEY_METRICS, M.TURN_SHARE):
        cells = []
        for name in models:
            value = fmt(results["overall"][name].get(m))
            ci = results.get("overall_ci", {}).get(name, {}).get(m)
            cells.append(f"{value} {interval(ci, '', signed=False)}" if ci else value)
        rows.append([m, M.unit_of(m), *cells])
    note = "Means over samples; brackets: 95% interval (clip-level bootstrap)."
    return [("h", 2, "Overall"), ("p", note), ("table", header, rows)]


def _groups(results: dict, key: str, title: str, label: str) -> list[tuple]:
    table = results[key]
    models = list(table)
    if not models:
        return []
    counts = results.get("counts", {}).get(key, {})
    order = sorted(table[models[0]], key=M.bin_order) if key == "by_curvature" else sorted(table[models[0]])
    rows = [
        [g, str(counts.get(g, {}).get("samples", "?")), str(counts.get(g, {}).get("clips", "?"))]
        + [fmt(table[m][g].get("min_ade")) for m in models]
        for g in order
    ]
    return [("h", 2, title), ("table", [label, "samples", "clips", *models], rows)]


def _paired(results: dict) -> list[tuple]:
    blocks: list[tuple] = []
    for name, paired in results["paired"].items():
        blocks += [
            ("h", 2, f"Paired: {name} - baseline"),
            ("p", "Negative = the fine-tuned model is better. Intervals: clip-level bootstrap, 95%."),
        ]
        header = [
            "metric",
            "bin",
            "unit",
            "mean delta",
            "95% CI",
            "win rate (share) [95% CI]",
            "samples",
            "clips",
            "verdict",
        ]
        rows = []
        for key, d in paired.items():
            metric, _, group = key.partition("@")
            win = f"{fmt(d['win_rate'])} {interval(d, '', 'win_rate_ci', signed=False)}"
            unit = M.unit_of(metric)
            rows.append(
                [metric, group or "all", unit, fmt(d["mean"], True), interval(d, "")]
                + [win, str(d["n"]), str(d["n_clips"]), M.verdict(d)]
            )
        blocks.append(("table", header, rows))
    return blocks


def _training(results: dict, figures: list) -> list[tuple]:
    runs = results.get("provenance", {}).get("runs", {})
    curves = [f for f in figures if f.kind == "loss"]
    if not runs and not curves:
        return []
    items = []
    for name, r in runs.items():
        best = r.get("best_val_loss")
        val = (
            f"best validation loss {fmt(best)} at step {r['best_val_step']}"
            if best is not None
            else "no validation loss"
        )
        items.append(
            f"**{name}** (`{r['folder']}`): {r['steps']} steps logged, training loss "
            f"{fmt(r.get('first_loss'))} -> {fmt(r.get('last_loss'))}, {val}"
        )
    note = "Flow-matching loss (MSE of the velocity in normalised action units, no physical unit)."
    return [("h", 2, "Training"), ("p", note), ("ul", items)] + [("img", f.file, f.caption) for f in curves]


def _pictures(results: dict, figures: list) -> list[tuple]:
    blocks: list[tuple] = []
    summary = [f for f in figures if f.kind == "summary"]
    if summary:
        blocks += [("h", 2, "Plots")] + [("img", f.file, f.caption) for f in summary]
    panels = [f for f in figures if f.kind == "panel"]
    if panels:
        blocks += [("h", 2, "Example panels"), ("p", panels[0].note)]
        for group in PANEL_GROUPS:
            chosen = [f for f in panels if f.group == group]
            if chosen:
                blocks += [("h", 3, group.capitalize() + ("s" if group != "random" else " samples"))]
                blocks += [("img", f.file, f.caption) for f in chosen]
    return blocks


def build(results: dict, figures: list) -> list[tuple]:
    """The report as blocks (see the module docstring)."""
    blocks: list[tuple] = [("h", 1, "alpamayo-cache evaluation"), *_verdicts(results)]
    blocks += _provenance(results) + _regressions(results)
    blocks += [("h", 2, "Conventions"), ("ul", [f"{k}: {v}" for k, v in results["conventions"].items()])]
    blocks += _overall(results)
    if "rewards" in results["conventions"]:
        blocks += RM.report_blocks(results)
    blocks += _groups(results, "by_curvature", "By ground-truth curvature (min_ade, m)", "bin")
    blocks += _groups(results, "by_camera_set", "By camera set (min_ade, m)", "camera set")
    blocks += _paired(results) + _training(results, figures) + _pictures(results, figures)
    return blocks


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{Path(block[1]).stem}]({block[1]})", "", f"*{block[2]}*", ""]
    return "\n".join(lines)


def write(path: Path, results: dict, figures: list) -> list[Path]:
    """report.md at ``path`` and report.html next to it (plots embedded); returns both paths."""
    from alpamayo_cache import report_html

    blocks = build(results, figures)
    path.write_text(to_markdown(blocks))
    html = path.with_suffix(".html")
    html.write_text(report_html.render(blocks, path.parent, "alpamayo-cache evaluation"))
    return [path, html]


# -- provenance: what a reviewer needs to know about the inputs -----------------------------------------


def training_log(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (empty when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def data_kind(description: str) -> str:
    """Synthetic (the built-in generator's files, recognised by its scenario table) or not."""
    for prefix in ("dev kit, hub cache ", "folder ", "own clips "):
        if description.startswith(prefix):
            root = Path(description[len(prefix) :].split(" @ ")[0])
            break
    else:
        return f"unknown origin (`{description}`)"
    if not root.exists():
        return f"unknown origin: `{description}` (the folder is gone)"
    marker = "metadata/synthetic_scenarios.parquet"
    if (root / marker).is_file() or any(root.glob(f"datasets--*/snapshots/*/{marker}")):
        return f"**synthetic** (the built-in generator's clips), read via `{description}`"
    return f"**real or own data** (not the built-in generator), read via `{description}`"


def _quoted(described: str) -> str:
    """A model description with its path in `code`."""
    for prefix in ("checkpoint ", "released weights "):
        if described.startswith(prefix):
            return f"{prefix}`{described[len(prefix) :]}`"
    return described


def _weights(described: str) -> str:
    described = _quoted(described)
    if described.startswith("preset"):
        return f"**seeded random weights**, {described}: an untrained starting point, not a released model"
    if described.startswith("released"):
        return f"**released weights**, {described}"
    return described


def _vlm(identity: str) -> str:
    if identity.startswith("preset:"):
        _, name, seed = identity.split(":", 2)
        seed = seed.removeprefix("seed")
        return f"**seeded random VLM** (preset {name}, seed {seed}): the features carry no real visual understanding"
    return f"**released VLM weights** (identity `{identity}`)"


def _run_summary(folder: Path) -> dict:
    records = training_log(folder)
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [(r["val_loss"], r["step"]) for r in records if r.get("val_loss") is not None]
    best = min(vals) if vals else (None, None)
    config = folder / "config.json"
    seed = json.loads(config.read_text()).get("train", {}).get("seed") if config.is_file() else None
    return {
        "folder": str(folder),
        "steps": records[-1]["step"] if records else 0,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "best_val_loss": best[0],
        "best_val_step": best[1],
        "train_seed": seed,
    }


def provenance(cfg, reader, infos: list, described: dict[str, str], run_folders: dict) -> dict:
    """Weights, data, store, counts and seeds of an evaluation. ``infos``: the evaluated samples'
    SampleInfo; ``described``: each model's description; ``run_folders``: model -> run folder or None."""
    store = reader.info
    sources = sorted({str(i.writer.get("data", "unknown")) for i in infos})
    runs = {name: _run_summary(Path(f)) for name, f in run_folders.items() if f is not None}
    seeds = {"eval noise": cfg.seed, "bootstrap": f"{cfg.seed} ({cfg.bootstrap} resamples)"}
    seeds.update({f"training {name}": r["train_seed"] for name, r in runs.items()})
    return {
        "baseline": _weights(described["baseline"]),
        "compared": {
            name: _quoted(text) + (f" (run `{run_folders[name]}`)" if run_folders.get(name) else "")
            for name, text in described.items()
            if name != "baseline"
        },
        "data": [data_kind(s) for s in sources],
        "store": {
            "path": str(cfg.store),
            "fingerprint": store.fingerprint,
            "layout_version": store.layout_version,
            "kv_dtype": store.kv_dtype,
            "compute_dtype": store.compute_dtype,
            "prompt_mode": store.prompt_mode,
            "vlm": _vlm(store.model_identity),
            "software": {
                k: v for k, v in store.created_by.items() if k in ("torch", "transformers", "device")
            },
        },
        "split": cfg.split,
        "camera_sets": sorted({i.camera_set for i in infos}),
        "samples": len(infos),
        "clips": len({i.clip_id for i in infos}),
        "seeds": seeds,
        "runs": runs,
    }
