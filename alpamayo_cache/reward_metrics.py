"""The rewards of reward-weighted fine-tuning (issue 16) as eval metrics, so an ``awr`` run can be
compared with an ``fm`` run on the same samples and the same initial noise.

Per sample and model, the K predicted trajectories and the logged one are scored exactly as training
scores its samples (rewards/from_policy.py), with the default RewardConfig (the same yardstick for every
model, whatever weights a run trained with). Columns of per_sample.csv (means over samples in
metrics.json, overall and per curvature bin):
- ``reward/total_best``, ``reward/<term>_best``: the best-by-total-reward of the K trajectories (not the
  best-by-ADE one of min_ade): its total and each of its terms;
- ``reward/total_mean``, ``reward/<term>_mean``: mean over the K trajectories (what a random draw scores);
- ``reward/logged_total``: the logged trajectory's total;
- ``reward/gt_is_best``: 1 when the logged trajectory scores at least the best of the K (the mean is the
  rate: lower means the model proposes trajectories the rewards prefer to the logged one);
- ``reward/trust_gated``: 1 when the trust gate lowered the logged trajectory's weight.
Terms: visual_safety, gt_similarity, reasoning_agreement, comfort; all in [0, 1], higher is better.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from alpamayo_cache.config import ActionSpaceConfig
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.rewards import RewardConfig, RewardResult, score
from alpamayo_cache.rewards.from_policy import Contexts, candidates, t0_speeds
from alpamayo_cache.store.reader import CachedSample, StoreReader

TERMS = ("visual_safety", "gt_similarity", "reasoning_agreement", "comfort")
# The columns the report's reward table shows, in order.
REPORT_KEYS = (
    "reward/total_best",
    "reward/total_mean",
    "reward/logged_total",
    *(f"reward/{t}_best" for t in TERMS),
    *(f"reward/{t}_mean" for t in TERMS),
    "reward/gt_is_best",
    "reward/trust_gated",
)
CONVENTION = (
    "heuristic reward terms in [0, 1] (higher is better); total = their weighted sum (default weights: "
    "safety 1.5, gt 0.5 x trust, reasoning 0.3, comfort 0, so up to 2.3); *_best: the best of K by total reward, *_mean: mean over K; gt_is_best: share of "
    "samples where the logged trajectory scores at least the best of K"
)


def metric_row(result: RewardResult, trust_max: float) -> dict[str, float]:
    """One sample's reward metrics (module docstring) from its RewardResult."""
    best = result.best
    row = {"reward/total_best": float(result.total[best]), "reward/total_mean": float(result.total.mean())}
    for term in TERMS:
        row[f"reward/{term}_best"] = float(result.terms[term][best])
        row[f"reward/{term}_mean"] = float(result.terms[term].mean())
    row["reward/logged_total"] = float(result.gt_total)
    row["reward/gt_is_best"] = float(result.gt_is_best)
    row["reward/trust_gated"] = float(result.trust < trust_max)
    return row


def add_reward_metrics(
    reader: StoreReader,
    sample_ids: list[str],
    truth: list[CachedSample],
    predictions: dict[str, dict[str, np.ndarray]],
    per_sample: dict[str, list[dict[str, float]]],
    space_cfg: ActionSpaceConfig,
    cfg: RewardConfig | None = None,
) -> None:
    """Add the reward columns to every model's per-sample rows (in place). predictions[name] holds
    ``action`` [n, K, w, 2] (normalised) and ``xyz`` [n, K, w, 3]."""
    cfg = cfg or RewardConfig()
    space = UnicycleActionSpace(space_cfg)
    contexts = Contexts()
    for i, (sid, sample) in enumerate(zip(sample_ids, truth, strict=True)):
        ctx = contexts.context(
            sample.info, sample.fut_xyz.numpy(), sample.hist_xyz.numpy(), reader.front_image(sid)
        )
        v0 = float(t0_speeds(space, sample.hist_xyz[None], sample.hist_rot[None])[0])
        logged = candidates(space_cfg, sample.action[None].numpy(), sample.fut_xyz[None].numpy(), v0)
        for name, pred in predictions.items():
            cand = candidates(space_cfg, pred["action"][i], pred["xyz"][i], v0)
            per_sample[name][i].update(metric_row(score(ctx, cand, cfg, logged), cfg.gt_trust_max))


def add_conventions(results: dict, cfg: RewardConfig | None = None) -> None:
    """Record how the reward metrics were computed (a conventions line and the reward settings)."""
    cfg = cfg or RewardConfig()
    results["conventions"]["rewards"] = CONVENTION
    results["reward_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def report_blocks(results: dict) -> list[tuple]:
    """The overall reward metrics of every model side by side, as report blocks (see report.py)."""
    models = list(results["overall"])
    rows = [
        [key.removeprefix("reward/"), *(_fmt(results["overall"][m].get(key)) for m in models)]
        for key in REPORT_KEYS
    ]
    note = f"{results['conventions'].get('rewards', CONVENTION)}."
    return [
        ("h", 2, "Rewards (heuristic, higher is better)"),
        ("p", note),
        ("table", ["metric", *models], rows),
    ]
