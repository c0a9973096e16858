"""Reward-weighted fine-tuning (issue 16): the stored front image, the awr objective's loss, exact
resume, the memory plan at real size, and the reward metrics of eval next to an fm run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alpamayo_cache.config import REAL, TINY
from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.data.camera_model import FRONT_CAMERA, CameraView
from alpamayo_cache.data.samples import SampleSpec, load_sample
from alpamayo_cache.data.source import open_source
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.head import init_head
from alpamayo_cache.model.pixels import resize_frames
from alpamayo_cache.model.policy import draw_noise
from alpamayo_cache.reward_metrics import metric_row
from alpamayo_cache.rewards import RewardResult
from alpamayo_cache.rewards.visual import corridor_mask
from alpamayo_cache.store import format as F
from alpamayo_cache.store.dataset import collate
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train import run
from alpamayo_cache.train.awr import RewardWeighted, awr_weights, noise_scales
from alpamayo_cache.train.objectives import check_store
from alpamayo_cache.train.plan import GIB, plan_for
from alpamayo_cache.train.plan import plan as memory_plan

# Small sampling settings keep the CPU runs short; the defaults (K=4, 10 steps) run the same code.
FAST = dict(objective="awr", awr_samples=2, awr_sample_steps=1, micro_batch=2)


def result(total: list[float], gt_total: float = 0.0, trust: float = 1.0) -> RewardResult:
    total_arr = np.asarray(total)
    terms = {name: np.full(len(total), 0.5) for name in ("visual_safety", "gt_similarity")}
    terms |= {"reasoning_agreement": np.full(len(total), 0.5), "comfort": np.full(len(total), 0.5)}
    best = int(total_arr.argmax())
    return RewardResult(
        total_arr, terms, trust, 0.5 * trust, best, gt_total, gt_total >= total_arr[best], {}, False
    )


def test_noise_scales_and_weights_by_hand():
    assert noise_scales(4, 0.2).tolist() == pytest.approx([1.0, 1.2, 1.4, 1.6])
    # advantage = best - mean: 0.8 - 0.5 = 0.3 -> exp(0.3 / 0.5); 3.0 - 1.0 = 2.0 -> exp(20) clipped to 20
    w = awr_weights([result([0.2, 0.8, 0.5]), result([0.0, 3.0, 0.0])], temperature=0.5, max_weight=20.0)
    assert w.tolist() == pytest.approx([math.exp(0.6), 20.0], rel=1e-6)
    assert awr_weights([result([0.4, 0.4])], 1.0, 20.0).tolist() == [1.0]  # all equal: plain weight 1


def test_metric_row_names_the_best_by_reward_and_the_gate():
    row = metric_row(result([0.2, 0.9, 0.4], gt_total=1.0, trust=0.1), trust_max=1.0)
    assert row["reward/total_best"] == pytest.approx(0.9) and row["reward/total_mean"] == pytest.approx(0.5)
    assert row["reward/gt_is_best"] == 1.0 and row["reward/trust_gated"] == 1.0
    assert row["reward/logged_total"] == 1.0 and row["reward/visual_safety_best"] == 0.5
    assert metric_row(result([0.2, 1.1], gt_total=1.0), 1.0)["reward/gt_is_best"] == 0.0


def test_precompute_keeps_the_front_frame_and_its_camera(tiny_store, synthetic_data):
    reader = StoreReader(tiny_store)
    assert reader.info.front_image_hw == [180, 320]
    sid = sorted(reader.sample_infos())[5]
    info = reader.sample_info(sid)
    stored = reader.read(sid, front=True).front_image.numpy()
    assert reader.read(sid).front_image is None  # the hot path does not read it
    # The same decoded frame as the prompt's last front-wide frame, resized to 180x320.
    source = open_source(synthetic_data)
    spec = SampleSpec(info.clip_id, info.t0_us, info.camera_set, info.split)
    native, _ = source.camera(info.clip_id, FRONT_CAMERA).decode_images_from_timestamps(
        np.array([info.t0_us])
    )
    assert np.array_equal(stored, resize_frames(native, F.FRONT_IMAGE_SIZE)[0])
    sample = load_sample(source, spec, TINY, front_hw=F.FRONT_IMAGE_SIZE)
    assert np.array_equal(sample.front, stored)
    # The camera record projects the logged path onto the rendered road (grey 70,70,75), not the sky.
    camera = CameraView.from_dict(info.front_camera)
    assert camera.image_hw == (180, 320)
    mask = corridor_mask(camera, reader.read(sid).fut_xyz.numpy())
    assert mask.sum() > 2000
    road = np.all(np.abs(stored[mask].astype(int) - [70, 70, 75]) <= 12, axis=-1).mean()
    assert road > 0.8, road


def test_awr_loss_is_fm_plus_weighted_regression_towards_the_best_sample(tiny_store):
    reader = StoreReader(tiny_store)
    batch = collate([reader.read(s, front=True) for s in sorted(reader.sample_infos())[:3]])
    prefix = Prefix.from_batch(batch)
    policy = init_head(TINY)
    cfg = TrainConfig(objective="awr", awr_samples=3, awr_sample_steps=3, awr_temperature=0.25)
    objective = RewardWeighted(cfg)
    loss, metrics = objective.loss(policy, prefix, batch, torch.Generator().manual_seed(7), "cpu")

    # By hand, from the same generator: K noises scaled 1, 1.2, 1.4, then (t, noise) of the two draws.
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((3, 3, 64, 2), generator=g) * torch.tensor([1.0, 1.2, 1.4])[None, :, None, None]
    actions = policy.sample(prefix, noise, 3)
    again, results = objective.score_samples(policy, prefix, batch, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(actions, again)
    assert [r.best for r in results] == [int(np.argmax(r.total)) for r in results]
    t, eps = draw_noise(3, 2, 64, g)
    total = 0.0
    for i, r in enumerate(results):
        one = Prefix.from_batch(collate([reader.read(batch.sample_ids[i])]))
        with torch.no_grad():
            fm = policy(one, batch.action[i : i + 1], t[i : i + 1, :1], eps[i : i + 1, :1])
            to_best = policy(one, actions[i : i + 1, r.best], t[i : i + 1, 1:], eps[i : i + 1, 1:])
        weight = min(math.exp((r.total[r.best] - r.total.mean()) / 0.25), 20.0)
        total += float(fm) + 0.5 * weight * float(to_best)
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    assert metrics["reward/gt_is_best"] == np.mean([r.gt_is_best for r in results])
    assert metrics["reward/best"] >= metrics["reward/mean"] and metrics["reward/weight"] >= 1.0
    assert 0.0 < metrics["reward/visual_safety"] < 1.0 and metrics["reward/trust_gated"] == 0.0


def test_awr_run_resumes_bitwise(tiny_store, tmp_path):
    def cfg(run_dir, **kw) -> TrainConfig:
        return TrainConfig(store=tiny_store, run_dir=run_dir, device="cpu", val_every=1000, **FAST, **kw)

    full = run(cfg(tmp_path / "full", steps=10, save_every=5))
    first = run(cfg(tmp_path / "split", steps=10, save_every=5, stop_after=4))
    second = run(cfg(tmp_path / "split", steps=10, save_every=5, resume=True))
    assert len(first.losses) == 4 and len(second.losses) == 6
    assert first.losses + second.losses == full.losses

    def rewards(path) -> list[dict]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("reward/")} for r in rows]

    logged = rewards(tmp_path / "full")
    assert len(logged) == 10 and logged == rewards(tmp_path / "split")  # the sampling RNG resumes too
    assert {"reward/gt_is_best", "reward/trust_gated", "reward/best_visual_safety"} <= set(logged[0])


def test_awr_refuses_a_store_without_front_images(tiny_store):
    old = SimpleNamespace(has_front_images=False)
    with pytest.raises(UserError, match="has none"):
        check_store(TrainConfig(store=tiny_store, objective="awr"), old)
    check_store(TrainConfig(store=tiny_store, objective="awr", reward_w_safety=0.0), old)
    check_store(TrainConfig(store=tiny_store), old)
    with pytest.raises(UserError, match="awr-samples"):
        TrainConfig(objective="awr", awr_samples=1)
    with pytest.raises(UserError, match="trust-min"):
        TrainConfig(reward_gt_trust_min=0.9, reward_gt_trust_max=0.5)


def test_memory_plan_covers_the_sampled_trajectories_at_real_size():
    L, K = 2993, 4
    awr = plan_for(TrainConfig(objective="awr", micro_batch=1), REAL, L, "cuda", "adamw8bit", True, "bf16")
    fm = plan_for(TrainConfig(micro_batch=1), REAL, L, "cuda", "adamw8bit", True, "bf16")
    n, span = K * 64, L + K * 64  # K draws folded into one sequence over the one prefix
    sampling = (
        2 * 8 * span * 128 * 2  # [prefix ; K w] K and V
        + 2 * 16 * span * 128 * 2  # repeated to the 16 query heads
        + 16 * n * span * 4  # fp32 attention weights
        + n * (4 * 2048 + (2 * 16 + 2 * 8) * 128) * 2  # hidden states, q/k/v/o of the K w tokens
        + n * 3 * 8256 * 2  # MLP intermediates
    )
    assert awr.memory.sampling == sampling  # 113 MB
    assert fm.memory.sampling == 0
    two = memory_plan(REAL, L, 1, "all", "adamw8bit", True, draws=2)
    assert awr.memory.activations == two.activations > fm.memory.activations
    assert awr.memory.total == fm.memory.total - fm.memory.activations + two.activations + sampling
    assert awr.memory.total < 24 * GIB  # default optimizer on CUDA (8-bit AdamW), micro-batch 1
    assert "sampling" in awr.describe(24) and "awr K=4" in awr.describe(24)


@pytest.mark.long
def test_awr_and_fm_runs_compare_in_one_eval_report(tiny_store, tmp_path):
    """Done-when of issue 16: fm and awr train a few steps; eval shows reward terms and gt_is_best."""
    from alpamayo_cache.evaluate import EvalConfig
    from alpamayo_cache.evaluate import run as evaluate

    base = dict(store=tiny_store, device="cpu", val_every=1000, steps=3)
    run(TrainConfig(run_dir=tmp_path / "fm", **base))
    run(TrainConfig(run_dir=tmp_path / "awr", **base, **FAST))
    out = tmp_path / "eval"
    checkpoints = (str(tmp_path / "fm"), str(tmp_path / "awr"))
    results = evaluate(
        EvalConfig(
            store=tiny_store, checkpoints=checkpoints, out_dir=out, device="cpu", num_samples=2, plots=False
        )
    )
    saved = json.loads((out / "metrics.json").read_text())
    for model in ("baseline", "fm", "awr"):
        row = saved["overall"][model]
        assert 0.0 <= row["reward/gt_is_best"] <= 1.0 and 0.0 < row["reward/visual_safety_best"] < 1.0
        assert row["reward/total_best"] >= row["reward/total_mean"]
    assert saved["overall"]["fm"]["reward/logged_total"] == saved["overall"]["awr"]["reward/logged_total"]
    assert "rewards" in saved["conventions"] and saved["reward_config"]["w_safety"] == 1.5
    header = (out / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert {"reward/gt_is_best", "reward/visual_safety_best", "reward/comfort_mean"} <= set(header)
    report = (out / "report.md").read_text()
    assert "## Rewards" in report and "| gt_is_best |" in report and "| fm | awr |" in report
    assert results["overall"]["awr"]["reward/total_best"] == saved["overall"]["awr"]["reward/total_best"]
