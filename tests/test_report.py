"""The evaluation report: clip-level intervals, verdicts, regressions, labelled panels, the self-contained
HTML page, provenance, and the TensorBoard events written next to metrics.jsonl."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from alpamayo_cache import metrics as M
from alpamayo_cache import plots, report, report_html
from alpamayo_cache.evaluate import EvalConfig

W = 64


def lateral_rows(offsets: list[float]) -> list[dict[str, float]]:
    """Per-sample metrics of straight 10 m/s predictions shifted sideways by ``offsets`` (m); the ground
    truth is the unshifted line, so min_ade = ade = min_fde = lateral error = |offset| and heading error 0."""
    t = np.arange(1, W + 1) * 0.1
    gt = np.stack([10 * t, np.zeros(W), np.zeros(W)], axis=-1)
    rot = np.broadcast_to(np.eye(3), (W, 3, 3)).copy()
    rows = []
    for offset in offsets:
        pred = gt.copy()
        pred[:, 1] = offset
        rows.append(M.sample_metrics(pred[None], rot[None], gt, rot))
    return rows


# Six clips of three samples: clips 0-2 on straight roads, 3-5 on sharp curves (bins are labels here).
CLIPS = [f"clip{c}" for c in range(6) for _ in range(3)]
BINS = ["straight" if c < 3 else "sharp" for c in range(6) for _ in range(3)]
BASE = [1.0 + 0.1 * c + 0.01 * j for c in range(6) for j in range(3)]


def summarise(**candidates: list[float]) -> dict:
    cfg = EvalConfig(store=Path("unused"), num_samples=1, bootstrap=2000, seed=0)
    per_sample = {"baseline": lateral_rows(BASE)} | {k: lateral_rows(v) for k, v in candidates.items()}
    results = M.summarise(cfg, dict.fromkeys(per_sample, "spec"), per_sample, BINS, ["default"] * 18, CLIPS)
    results["config"] = {"split": "val", "num_samples": 1}
    return results


def test_cluster_bootstrap_is_as_wide_as_its_clips():
    """Two clips of 50 identical samples each carry the information of two samples, not of 100."""
    base = np.zeros(100)
    cand = np.r_[np.zeros(50), np.full(50, -2.0)]
    clustered = M.paired_delta(cand, base, clusters=["a"] * 50 + ["b"] * 50)
    two = M.paired_delta([0.0, -2.0], [0.0, 0.0], clusters=["a", "b"])
    per_sample = M.paired_delta(cand, base)  # every sample its own clip: the too-narrow interval
    assert (clustered["ci_low"], clustered["ci_high"]) == (-2.0, 0.0) == (two["ci_low"], two["ci_high"])
    assert clustered["mean"] == -1.0 and clustered["n"] == 100 and clustered["n_clips"] == 2
    assert (clustered["win_rate_ci_low"], clustered["win_rate"], clustered["win_rate_ci_high"]) == (
        0.0,
        0.5,
        1.0,
    )
    assert per_sample["ci_high"] - per_sample["ci_low"] < 0.5
    assert M.verdict(clustered) == M.NO_DIFFERENCE


def test_vectorised_cluster_bootstrap_matches_a_loop():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 40))
    clips = rng.integers(0, 7, 40).astype(str)
    boots = M.cluster_bootstrap(values, clips, seed=5, n_boot=50)
    labels = np.unique(clips)
    draws = np.random.default_rng(5).integers(0, len(labels), size=(50, len(labels)))
    for b, draw in enumerate(draws):
        chosen = np.concatenate([np.flatnonzero(clips == labels[j]) for j in draw])
        np.testing.assert_allclose(boots[:, b], values[:, chosen].mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(boots, M.cluster_bootstrap(values, clips, seed=5, n_boot=50))


def test_one_clip_gets_no_interval_and_no_verdict():
    d = M.paired_delta([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], clusters=["a", "a", "a"])
    assert d["mean"] == -1.0 and d["ci_low"] is None and d["ci_high"] is None
    assert M.verdict(d) == M.NO_DIFFERENCE
    assert "no interval" in report.interval(d, "m")


def test_verdict_sentences_better_worse_inconclusive():
    results = summarise(
        good=[b - 0.5 for b in BASE],
        bad=[b + 0.5 for b in BASE],
        mixed=[b + (0.3 if (i // 3) % 2 else -0.3) for i, b in enumerate(BASE)],
    )
    assert {n: v["verdict"] for n, v in results["verdicts"].items()} == {
        "good": "better",
        "bad": "worse",
        "mixed": "no significant difference",
    }
    text = report.to_markdown(report.build(results, []))
    first = text.split("## Provenance")[0] if "## Provenance" in text else text.split("## Regressions")[0]
    lines = [line for line in first.splitlines() if line.startswith("**")]
    assert lines[0] == (
        "**good is better than the baseline** on min_ade (best-of-1 XY ADE over 6.4 s, split val): "
        "mean paired delta -0.500 m, 95% CI [-0.500, -0.500] m (clip-level bootstrap over 6 clips, "
        "18 samples; negative = better). No regressions."
    )
    assert lines[1].startswith("**bad is worse than the baseline** on min_ade")
    assert "mean paired delta +0.500 m, 95% CI [+0.500, +0.500] m" in lines[1]
    mixed = results["paired"]["mixed"]["min_ade"]
    assert mixed["ci_low"] < 0 < mixed["ci_high"] and mixed["n_clips"] == 6
    assert lines[2].startswith("**mixed: no significant difference from the baseline** on min_ade")
    assert f"95% CI [{mixed['ci_low']:+.3f}, {mixed['ci_high']:+.3f}] m" in lines[2]


def test_regressions_are_listed_by_metric_and_bin():
    # Better on sharp curves, worse on straight roads: no overall verdict, but the straight bin regressed.
    straight_worse = [b + (0.5 if s == "straight" else -0.5) for b, s in zip(BASE, BINS, strict=True)]
    results = summarise(sw=straight_worse, good=[b - 0.5 for b in BASE])
    assert results["verdicts"]["sw"]["verdict"] == M.NO_DIFFERENCE
    keys = [r["key"] for r in results["regressions"]["sw"]]
    # One sample per prediction: its centre is itself, so centre_gap stays 0; heading error stays 0 too.
    assert keys == [f"{m}@straight" for m in M.KEY_METRICS if m not in ("heading_error_deg", "centre_gap")]
    assert results["regressions"]["good"] == []
    section = report.to_markdown(report.build(results, [])).split("## Regressions")[1].split("\n## ")[0]
    assert (
        "- **sw**, min_ade on the straight bin (9 samples, 3 clips): +0.500 m, 95% CI [+0.500, +0.500] m"
        in section
    )
    assert "lateral_error_6.4s on the straight bin" in section and "sharp" not in section
    none = report.to_markdown(report.build(summarise(good=[b - 0.5 for b in BASE]), []))
    assert "## Regressions\n\nNone: no metric or bin" in none


def test_units_on_every_metric():
    assert [M.unit_of(k) for k in ("min_ade@sharp", "heading_error_deg", M.TURN_SHARE, "min_fde")] == [
        "m",
        "deg",
        "share",
        "m",
    ]
    results = summarise(good=[b - 0.5 for b in BASE])
    for row in [b for b in report.build(results, []) if b[0] == "table"][0][2]:
        assert row[1] in ("m", "deg", "share"), row  # the overall table's unit column


def test_panels_are_chosen_by_group_and_labelled(monkeypatch):
    change = np.array([0.5, -1.0, 0.2, -0.3, 0.0, 2.0, -0.1, 0.4, 0.0])
    chosen = plots.choose_panels(change, 9, 6, seed=0)
    assert chosen[:4] == [
        ("largest improvement", 1),
        ("largest improvement", 3),
        ("largest regression", 5),
        ("largest regression", 0),
    ]
    assert [g for g, _ in chosen[4:]] == ["random", "random"]
    assert {i for _, i in chosen[4:]} <= {2, 4, 6, 7, 8} and chosen == plots.choose_panels(change, 9, 6, 0)
    # No regressions to show: their slots go to the random draw; nothing to compare: all random.
    assert [g for g, _ in plots.choose_panels(-np.ones(5), 5, 3, 0)] == [
        "largest improvement",
        "random",
        "random",
    ]
    assert {g for g, _ in plots.choose_panels(None, 5, 3, 0)} == {"random"}

    titles = []
    monkeypatch.setattr(plots, "sample_panel", lambda path, thumbs, truth, preds, title: titles.append(title))

    class Reader:
        def thumbnails(self, sid):
            return None

    per_sample = {"baseline": lateral_rows([1.0] * 9), "ft": lateral_rows(list(1.0 + change))}
    preds = {m: {"xyz": np.zeros((9, 1, W, 3))} for m in per_sample}
    ids = [f"s{i}" for i in range(9)]
    figures = plots._panels(Path("unused"), Reader(), ids, [None] * 9, preds, per_sample, ["sharp"] * 9, 6, 0)
    assert [f.group for f in figures] == [g for g, _ in chosen]
    assert titles[0].startswith("[largest improvement 1/2] s1 [sharp]")
    assert figures[2].caption.startswith("Largest regression 1/2: s5 (sharp bin)")
    assert "change +2.00 m" in figures[2].caption
    text = report.to_markdown(report.build(summarise(good=[b - 0.5 for b in BASE]), figures))
    panels = text.split("## Example panels")[1]
    assert "Panels: the 2 samples where ft lowers min_ade the most" in panels
    assert panels.index("### Largest improvements") < panels.index("### Largest regressions")
    assert panels.index("### Largest regressions") < panels.index("### Random samples")


def test_html_is_self_contained(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(tmp_path / "plots" / "p.png")
    plt.close(fig)
    blocks = report.build(summarise(good=[b - 0.5 for b in BASE]), [])
    blocks += [("p", "a <script> and **bold** `code`"), ("img", "plots/p.png", "a picture")]
    page = report_html.render(blocks, tmp_path, "t")
    assert re.findall(r"(?:src|href)=\"(?!data:)", page) == [] and "http" not in page.lower()
    assert "<link" not in page and "<script>" not in page
    assert "&lt;script&gt; and <strong>bold</strong> <code>code</code>" in page
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(uri) == (tmp_path / "plots" / "p.png").read_bytes()
    assert '<td class="better">better</td>' in page


def test_data_kind_tells_synthetic_from_other_data(synthetic_data, tmp_path):
    revision = (
        synthetic_data / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles" / "refs" / "main"
    ).read_text()
    assert report.data_kind(f"dev kit, hub cache {synthetic_data} @ {revision[:12]}").startswith(
        "**synthetic**"
    )
    assert report.data_kind(f"folder {tmp_path}").startswith("**real or own data**")
    assert report.data_kind(f"own clips {tmp_path / 'gone'}").startswith("unknown origin")


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))  # the event files directly in ``folder`` (not the hparams ones below)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(tiny_store, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (a dependency in pyproject)")
    from alpamayo_cache.train import TrainConfig
    from alpamayo_cache.train import run as train

    run_dir = tmp_path / "run"
    common = dict(store=tiny_store, run_dir=run_dir, steps=4, device="cpu", val_every=2, save_every=2)
    train(TrainConfig(**common, stop_after=3))
    # As if killed after logging step 3 but before its checkpoint: the resume redoes step 3.
    shutil.rmtree(run_dir / "checkpoints" / "step-000003")
    train(TrainConfig(**common, resume=True))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run_dir / "tracking" / "alpamayo-cache")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]  # the resumed run's step 3 replaced the first one
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [s for s, _ in scalars["val_loss"]] == [2, 4]
    assert [v for _, v in scalars["val_loss"]] == pytest.approx(
        [records[1]["val_loss"], records[3]["val_loss"]]
    )
    assert {"lr", "samples_per_s", "grad_norm"} <= set(scalars)
    off = tmp_path / "off"
    train(TrainConfig(store=tiny_store, run_dir=off, steps=1, device="cpu", trackers=()))
    assert not (off / "tracking").exists()
