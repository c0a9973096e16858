"""Rewards for reward-weighted fine-tuning (issue 16): pure functions over (sample, trajectories).

``REWARDS`` maps a name to ``fn(ctx: RewardContext, cand: Candidates) -> np.ndarray [K]`` in [0, 1],
higher is better: ``gt_similarity``, ``comfort`` (terms.py), ``reasoning_agreement`` (reasoning.py),
``visual_safety`` (visual.py). ``score(ctx, cand, RewardConfig())`` combines them with the trust gate
(combine.py). New rewards register with ``@reward("name")``.
"""

from alpamayo_cache.data.camera_model import CameraView
from alpamayo_cache.rewards import reasoning, terms, visual  # noqa: F401  (fill the registry)
from alpamayo_cache.rewards.base import REWARDS, Candidates, RewardContext, RewardFn, reward
from alpamayo_cache.rewards.combine import DANGER_KEYWORDS, RewardConfig, RewardResult, score, trust_weight

__all__ = [
    "DANGER_KEYWORDS",
    "REWARDS",
    "CameraView",
    "Candidates",
    "RewardConfig",
    "RewardContext",
    "RewardFn",
    "RewardResult",
    "reward",
    "score",
    "trust_weight",
]
