"""Reward-weighted fine-tuning (issue 16, the SRD-RL method): advantage-weighted regression towards the
best of K trajectories the policy samples itself, next to the usual flow matching.

Per micro-batch (every random number from the micro-batch's generator, drawn on the CPU, so a resumed
run and any split over ranks compute the same step):
1. K initial noises [b, K, w, 2]; draw i (0-based) is scaled by 1 + noise_growth * i, so later draws
   explore further from the mode;
2. K trajectories per sample with the eval sampler (``Policy.sample``: K draws folded into the token
   axis over one read of the prefix, Euler, no grad), turned into poses by the action space;
3. rewards (alpamayo_cache.rewards.score: visual safety on the stored front image, similarity to the
   logged trajectory behind the trust gate, reasoning agreement, comfort); best = argmax of the K totals;
4. advantage A = best total - mean total of the K (>= 0: how much better the best is than what the policy
   does on average here); weight = min(exp(A / temperature), max_weight) (AWR, Peng et al. 2019);
5. loss = mean_b fm(logged) + rl_loss_weight * mean_b weight_b * fm(best sample), one forward with the
   two targets folded as two draws (one flow-matching time and noise each).
The weights are not normalised over the batch: a sample whose best draw stands out pulls harder, and
a micro-batch of one keeps its weight. Logged per step: reward terms (mean over the K samples), the best
sample's visual safety and gt similarity next to the logged trajectory's safety, the share of samples
where the logged trajectory scores at least the best sample (gt_is_best) and where the trust gate fired.
The validation loss stays the plain flow-matching loss on the logged trajectory, comparable with fm runs.
"""

from __future__ import annotations

import numpy as np
import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.policy import draw_noise
from alpamayo_cache.rewards import RewardConfig, RewardResult, score
from alpamayo_cache.rewards.combine import DANGER_KEYWORDS
from alpamayo_cache.rewards.from_policy import Contexts, candidates, t0_speeds, trajectories
from alpamayo_cache.store.dataset import Batch

TERMS = ("visual_safety", "gt_similarity", "reasoning_agreement", "comfort")


def reward_config(cfg: TrainConfig) -> RewardConfig:
    """The RewardConfig of a run's --reward-* options (empty keywords: the built-in list)."""
    return RewardConfig(
        w_safety=cfg.reward_w_safety,
        w_gt=cfg.reward_w_gt,
        w_reasoning=cfg.reward_w_reasoning,
        w_comfort=cfg.reward_w_comfort,
        safety_threshold=cfg.reward_safety_threshold,
        gt_trust_min=cfg.reward_gt_trust_min,
        gt_trust_max=cfg.reward_gt_trust_max,
        gt_scale_m=cfg.reward_gt_scale_m,
        danger_keywords=tuple(cfg.reward_danger_keywords) or DANGER_KEYWORDS,
    )


def noise_scales(k: int, growth: float) -> torch.Tensor:
    """[K] factors 1 + growth * i on the initial noise of draw i."""
    return 1.0 + growth * torch.arange(k, dtype=torch.float32)


def awr_weights(results: list[RewardResult], temperature: float, max_weight: float) -> torch.Tensor:
    """[b] weights exp((best - mean total) / temperature), clipped to max_weight."""
    advantage = torch.tensor([float(r.total[r.best] - r.total.mean()) for r in results], dtype=torch.float64)
    return torch.exp(advantage / temperature).clamp(max=max_weight).float()


def step_metrics(results: list[RewardResult], weights: torch.Tensor, trust_max: float) -> dict[str, float]:
    """Means over the micro-batch's samples of what the loop logs (keys 'reward/...')."""
    out = {
        "reward/mean": float(np.mean([r.total.mean() for r in results])),
        "reward/best": float(np.mean([r.total[r.best] for r in results])),
        "reward/logged": float(np.mean([r.gt_total for r in results])),
        "reward/advantage": float(np.mean([r.total[r.best] - r.total.mean() for r in results])),
        "reward/weight": float(weights.mean()),
    }
    for term in TERMS:
        out[f"reward/{term}"] = float(np.mean([r.terms[term].mean() for r in results]))
    out["reward/best_visual_safety"] = float(np.mean([r.terms["visual_safety"][r.best] for r in results]))
    out["reward/best_gt_similarity"] = float(np.mean([r.terms["gt_similarity"][r.best] for r in results]))
    out["reward/logged_visual_safety"] = float(np.mean([r.gt_terms["visual_safety"] for r in results]))
    out["reward/gt_is_best"] = float(np.mean([r.gt_is_best for r in results]))
    out["reward/trust_gated"] = float(np.mean([r.trust < trust_max for r in results]))
    return out


class RewardWeighted:
    """The ``awr`` objective (module docstring). Needs the front-camera images: ``reads_front``."""

    reads_front = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rewards = reward_config(cfg)
        self.contexts = Contexts()

    def score_samples(self, policy, prefix: Prefix, batch: Batch, generator: torch.Generator, device: str):
        """K sampled actions [b, K, w, 2] (CPU, float32) and their RewardResults (one per sample)."""
        c = self.cfg
        b, w = batch.action.shape[:2]
        noise = torch.randn((b, c.awr_samples, w, 2), generator=generator)
        noise = noise * noise_scales(c.awr_samples, c.awr_noise_growth)[None, :, None, None]
        actions = policy.sample(prefix, noise.to(device), c.awr_sample_steps).float().cpu()
        space = UnicycleActionSpace(policy.cfg.action_space)
        xyz, _ = trajectories(space, actions, batch.hist_xyz, batch.hist_rot)
        v0 = t0_speeds(space, batch.hist_xyz, batch.hist_rot)
        gt_xyz, hist_xyz, logged_action = batch.fut_xyz.numpy(), batch.hist_xyz.numpy(), batch.action.numpy()
        results = []
        for i, info in enumerate(batch.infos):
            image = None if batch.front_image is None else batch.front_image[i].numpy()
            ctx = self.contexts.context(info, gt_xyz[i], hist_xyz[i], image)
            cand = candidates(space.cfg, actions[i].numpy(), xyz[i].numpy(), float(v0[i]))
            logged = candidates(space.cfg, logged_action[i, None], gt_xyz[i, None], float(v0[i]))
            results.append(score(ctx, cand, self.rewards, logged))
        return actions, results

    def loss(self, model, prefix: Prefix, batch: Batch, generator: torch.Generator, device: str):
        c = self.cfg
        policy = getattr(model, "module", model)  # DDP: sample without the wrapper (no grad, no sync)
        actions, results = self.score_samples(policy, prefix, batch, generator, device)
        weights = awr_weights(results, c.awr_temperature, c.awr_max_weight)
        b, w = batch.action.shape[:2]
        best = torch.stack([actions[i, r.best] for i, r in enumerate(results)])  # [b, w, 2]
        targets = torch.stack([batch.action, best], dim=1)  # [b, 2, w, 2]: logged, best sample
        t, noise = draw_noise(b, 2, w, generator)
        per_draw = torch.stack([torch.ones(b), c.rl_loss_weight * weights], dim=1)  # [b, 2]
        # Policy.forward divides by the weights' sum; scaling back by sum / b gives the plain mean over
        # samples of fm + rl_loss_weight * weight * fm(best) (the weights stay absolute, not normalised).
        loss = model(prefix, targets.to(device), t, noise, per_draw) * (float(per_draw.sum()) / b)
        return loss, step_metrics(results, weights, self.rewards.gt_trust_max)
