"""The combined reward of issue 16 (SRD-RL) and its trust gate.

total = w_safety * visual_safety + w_gt * trust * gt_similarity + w_reasoning * reasoning_agreement
        + w_comfort * comfort

Trust gate: when the reasoning text names a danger (a word starting with one of ``danger_keywords``,
not negated) and the visual safety of the LOGGED trajectory is below ``safety_threshold`` (strictly),
trust = gt_trust_min; otherwise trust = gt_trust_max. The logged trajectory may then be outscored by a
sample that avoids the hazard. ``gt_is_best``: the logged trajectory, scored as one more candidate with
the same trust, reaches at least the best sample's total (a tie counts for the logged one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from alpamayo_cache.errors import UserError
from alpamayo_cache.rewards.base import REWARDS, Candidates, RewardContext
from alpamayo_cache.rewards.reasoning import names_danger

DANGER_KEYWORDS: tuple[str, ...] = (
    "mud",
    "rock",
    "obstacle",
    "debris",
    "flood",
    "pothole",
    "puddle",
    "gravel",
    "ice",
    "icy",
    "construction",
)


@dataclass(frozen=True)
class RewardConfig:
    """Weights, the trust gate and the gt-similarity scale (defaults from issue 16)."""

    w_safety: float = 1.5
    w_gt: float = 0.5
    w_reasoning: float = 0.3
    w_comfort: float = 0.0
    safety_threshold: float = 0.3
    gt_trust_min: float = 0.1
    gt_trust_max: float = 1.0
    gt_scale_m: float = 1.0
    danger_keywords: tuple[str, ...] = DANGER_KEYWORDS

    def __post_init__(self) -> None:
        for name in ("w_safety", "w_gt", "w_reasoning", "w_comfort", "gt_trust_min", "gt_trust_max"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise UserError(f"rewards.{name} = {value!r}: use a finite number >= 0")
        if self.w_safety + self.w_gt + self.w_reasoning + self.w_comfort <= 0:
            raise UserError(
                "reward weights are all 0: give at least one of w_safety/w_gt/w_reasoning/w_comfort > 0"
            )
        if self.gt_trust_min > self.gt_trust_max:
            raise UserError(
                f"rewards.gt_trust_min ({self.gt_trust_min}) > gt_trust_max ({self.gt_trust_max}): swap them"
            )
        t = self.safety_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise UserError(f"rewards.safety_threshold = {t!r}: use a number in [0, 1]")
        s = self.gt_scale_m
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise UserError(f"rewards.gt_scale_m = {s!r}: use a length in metres > 0")
        words = (self.danger_keywords,) if isinstance(self.danger_keywords, str) else self.danger_keywords
        words = tuple(str(k).strip().lower() for k in words)
        if not all(k.replace("-", "").replace(" ", "").isalpha() for k in words):
            raise UserError(f"rewards.danger_keywords {words}: use non-empty words (letters only)")
        object.__setattr__(self, "danger_keywords", words)


@dataclass(frozen=True)
class RewardResult:
    """Scores of K samples (arrays [K]) and of the logged trajectory (floats)."""

    total: np.ndarray
    terms: dict[str, np.ndarray]
    trust: float  # the gate's factor on w_gt
    gt_weight: float  # w_gt * trust
    best: int  # index of the best sample
    gt_total: float
    gt_is_best: bool  # gt_total >= total[best]
    gt_terms: dict[str, float] = field(default_factory=dict)
    danger: bool = False  # the reasoning text names a danger


def trust_weight(reasoning: str, logged_safety: float, cfg: RewardConfig) -> float:
    """gt_trust_min if the text names a danger and logged_safety < safety_threshold, else gt_trust_max."""
    if names_danger(reasoning, cfg.danger_keywords) and logged_safety < cfg.safety_threshold:
        return float(cfg.gt_trust_min)
    return float(cfg.gt_trust_max)


def score(
    ctx: RewardContext, cand: Candidates, cfg: RewardConfig | None = None, logged: Candidates | None = None
) -> RewardResult:
    """Score K samples and the logged trajectory.

    logged: the logged trajectory as one candidate with its controls (e.g. from the action space's
    traj_to_action); by default they come from Candidates.from_xyz(ctx.gt_xyz) (finite differences).
    """
    cfg = cfg or RewardConfig()
    if logged is None:
        logged = Candidates.from_xyz(ctx.gt_xyz[None], v0=ctx.t0_speed, dt=cand.dt)
    if logged.k != 1:
        raise ValueError(f"logged must hold exactly one trajectory, got {logged.k}")
    both = cand.concat(logged)  # one pass: the logged trajectory is candidate K
    terms = {
        "visual_safety": REWARDS["visual_safety"](ctx, both),
        "gt_similarity": REWARDS["gt_similarity"](ctx, both, scale=cfg.gt_scale_m),
        "reasoning_agreement": REWARDS["reasoning_agreement"](ctx, both),
        "comfort": REWARDS["comfort"](ctx, both),
    }
    danger = names_danger(ctx.reasoning, cfg.danger_keywords)
    trust = trust_weight(ctx.reasoning, float(terms["visual_safety"][-1]), cfg)
    gt_weight = cfg.w_gt * trust
    total = (
        cfg.w_safety * terms["visual_safety"]
        + gt_weight * terms["gt_similarity"]
        + cfg.w_reasoning * terms["reasoning_agreement"]
        + cfg.w_comfort * terms["comfort"]
    )
    best = int(np.argmax(total[:-1]))
    return RewardResult(
        total=total[:-1],
        terms={name: values[:-1] for name, values in terms.items()},
        trust=trust,
        gt_weight=gt_weight,
        best=best,
        gt_total=float(total[-1]),
        gt_is_best=bool(total[-1] >= total[best]),
        gt_terms={name: float(values[-1]) for name, values in terms.items()},
        danger=danger,
    )
