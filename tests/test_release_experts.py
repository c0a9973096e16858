"""The 1.5 guided sampler and the 2 Super expert against the releases' own numbers
(tests/fixtures/releases/, float32 CPU). Each model is built from the fixture's metadata (its
action_in_proj uses max_freq 4 and its action_out_proj was scaled; see the fixture README)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alpamayo_cache.config import TINY_2S, TINY_15, ActionInProjConfig, ExpertConfig, TextConfig
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.model.expert import Prefix, action_position_ids, attention_mask
from alpamayo_cache.model.policy import Policy
from alpamayo_cache.model.weights import from_release_keys, load_into
from tests.test_release_prompts import load

TOL = 1e-5


def text_config(meta: dict, vocab: int) -> TextConfig:
    return TextConfig(
        num_layers=meta["num_hidden_layers"],
        hidden_size=meta["hidden_size"],
        intermediate_size=meta.get("intermediate_size", 128),
        num_heads=meta["num_attention_heads"],
        num_kv_heads=meta["num_key_value_heads"],
        head_dim=meta["head_dim"],
        vocab_size=vocab,
        rms_norm_eps=meta["rms_norm_eps"],
        rope_theta=meta["rope_theta"],
        mrope_section=tuple(meta["rope_scaling"]["mrope_section"]),
    )


def expert_config(meta: dict, num_layers: int | None = None) -> ExpertConfig:
    return ExpertConfig(
        hidden_size=meta["hidden_size"],
        intermediate_size=meta["intermediate_size"],
        num_heads=meta["num_attention_heads"],
        head_dim=meta["head_dim"],
        num_layers=num_layers,
    )


@pytest.fixture(scope="module")
def a15():
    return load("a15_guidance")


@pytest.fixture(scope="module")
def a2():
    return load("a2_expert")


def policy_15(a15) -> Policy:
    t, meta = a15
    cfg = dataclasses.replace(
        TINY_15,
        expert=expert_config(meta["expert_text_config"]),
        action_in_proj=ActionInProjConfig(**meta["action_in_proj"]),
    )
    policy = Policy(cfg, attention="bidirectional").eval()
    weights = {k: v for k, v in t.items() if not k.startswith("b2n1.")}
    load_into(policy, from_release_keys(weights, cfg.head_key_prefix), "a15_guidance fixture")
    return policy


def prefix_15(t: dict, branch: str) -> Prefix:
    k = t[f"b2n1.{branch}.k"]
    prompt_mask = t[f"b2n1.{branch}.prefix_mask"].bool()
    generated = torch.ones(k.shape[1], k.shape[3] - prompt_mask.shape[1], dtype=torch.bool)
    return Prefix(
        keys=k,
        values=t[f"b2n1.{branch}.v"],
        rope_deltas=t[f"b2n1.{branch}.rope_deltas"][:, 0].long(),
        lengths=t[f"b2n1.{branch}.offset"].long(),
        key_mask=torch.cat([prompt_mask, generated], dim=1),
    )


def repeat(prefix: Prefix, n: int) -> Prefix:
    """The batch n times over (rows i, i + b, ... are the same sample)."""
    return Prefix(
        keys=prefix.keys.repeat(1, n, 1, 1, 1),
        values=prefix.values.repeat(1, n, 1, 1, 1),
        rope_deltas=prefix.rope_deltas.repeat(n),
        lengths=prefix.lengths.repeat(n),
        key_mask=prefix.key_mask.repeat(n, 1),
    )


@pytest.mark.parametrize("branch", ["guided", "unguided"])
def test_15_positions_and_mask_follow_the_release(a15, branch):
    t, _ = a15
    prefix = prefix_15(t, branch)
    assert torch.equal(action_position_ids(prefix, 1, 64), t[f"b2n1.{branch}.position_ids"].long())
    mask = attention_mask(prefix, 1, 64, "bidirectional")
    assert mask is not None and mask.shape == (2, 1, 64, prefix.width + 64)
    release_masked = t[f"b2n1.{branch}.masked"].bool()
    assert torch.equal(mask[:, 0], ~release_masked[:, None, :].expand(-1, 64, -1))  # every query row


def test_15_velocities_and_guided_integration(a15):
    t, meta = a15
    policy = policy_15(a15)
    cond, uncond = prefix_15(t, "guided"), prefix_15(t, "unguided")
    x0 = t["b2n1.x0"][:, None]
    assert torch.equal(x0, t["b2n1.noise"][:, None] * meta["temperature"])
    zero = torch.zeros(2, 1)
    with torch.no_grad():
        v_cond = policy.velocity(x0, zero, cond)[:, 0]
        v_uncond = policy.velocity(x0, zero, uncond)[:, 0]
    assert (v_cond - t["b2n1.velocity_cond_t0"]).abs().max() < TOL
    assert (v_uncond - t["b2n1.velocity_uncond_t0"]).abs().max() < TOL
    # The three weights in one batch (one weight per row): 3 x 2 rows, each row's own prefix and noise.
    weights = meta["guidance_weights"]
    n = len(weights)
    actions = policy.sample(
        repeat(cond, n),
        x0.repeat(n, 1, 1, 1),
        meta["steps"],
        repeat(uncond, n),
        torch.tensor(weights).repeat_interleave(2),
    )[:, 0]
    errors = {
        w: float((actions[2 * i : 2 * i + 2] - t[f"b2n1.action_w{w}"]).abs().max())
        for i, w in enumerate(weights)
    }
    assert max(errors.values()) < TOL, errors
    # The weights matter: w = 1.0 is not the w = 1.5 answer (the fixture moves by ~1e-3).
    assert (t["b2n1.action_w1.5"] - t["b2n1.action_w1.0"]).abs().max() > 50 * TOL


def test_15_guided_trajectory(a15):
    """The release's trajectory from the guided actions (action space integration, fp32)."""
    t, _ = a15
    space = UnicycleActionSpace(TINY_15.action_space)
    xyz, _ = space.action_to_traj(
        t["b2n1.action_w1.5"], t["b2n1.ego_history_xyz"][:, 0], t["b2n1.ego_history_rot"][:, 0]
    )
    assert (xyz - t["b2n1.pred_xyz_w1.5"]).abs().max() < 1e-4


def test_15_padding_is_masked_not_ignored(a15):
    """Without the left-pad mask the velocities move (the fixture pins the mask)."""
    t, _ = a15
    policy = policy_15(a15)
    prefix = prefix_15(t, "guided")
    bare = dataclasses.replace(prefix, key_mask=None)
    x0, zero = t["b2n1.x0"][:, None], torch.zeros(2, 1)
    with torch.no_grad():
        moved = (policy.velocity(x0, zero, bare) - policy.velocity(x0, zero, prefix)).abs().max()
    assert moved > 50 * TOL


def policy_2s(a2, depth: int) -> Policy:
    t, meta = a2
    cfg = dataclasses.replace(
        TINY_2S,
        text=text_config(meta["vlm_text"], TINY_2S.text.vocab_size),
        expert=expert_config(meta["expert_llm_config"], num_layers=depth),
        action_in_proj=ActionInProjConfig(**meta["action_in_proj"]),
    )
    policy = Policy(cfg, attention="bidirectional").eval()
    weights = {k: v for k, v in t.items() if k.startswith("expert.")}
    mapped = from_release_keys(weights, cfg.head_key_prefix)
    keep = {
        k: v for k, v in mapped.items() if not k.startswith("expert.layers.") or int(k.split(".")[2]) < depth
    }
    load_into(policy, keep, f"a2_expert fixture depth {depth}")
    return policy


def prefix_2s(t: dict) -> Prefix:
    return Prefix(
        keys=t["cache.k"],
        values=t["cache.v"],
        rope_deltas=t["cache.rope_deltas"][:, 0].long(),
        lengths=t["cache.offset"].long(),
        key_mask=t["cache.prefix_mask"].bool(),
    )


def test_2super_positions_and_mask(a2):
    t, _ = a2
    prefix = prefix_2s(t)
    assert torch.equal(action_position_ids(prefix, 1, 64), t["step.position_ids"].long())
    mask = attention_mask(prefix, 1, 64, "bidirectional")
    assert torch.equal(mask[:, 0], ~t["step.masked"].bool()[:, None, :].expand(-1, 64, -1))


@pytest.mark.parametrize("depth", [4, 2])
def test_2super_expert_velocity_and_sampler(a2, depth):
    """Expert width 48 on a width-64 VLM; the depth-2 expert reads VLM cache layers 0 and 1 only."""
    t, _ = a2
    policy = policy_2s(a2, depth)
    assert len(policy.expert.layers) == depth
    prefix = prefix_2s(t)
    with torch.no_grad():
        v = policy.velocity(t["step.noisy_action"][:, None], t["step.timestep"].reshape(2, 1), prefix)[:, 0]
    assert (v - t[f"depth{depth}.velocity"]).abs().max() < TOL
    actions = policy.sample(prefix, t[f"depth{depth}.euler_noise"][:, None], 10)[:, 0]
    assert (actions - t[f"depth{depth}.euler_10_steps"]).abs().max() < TOL


def test_2super_training_targets(a2):
    """2 Super's action labels: curvature clamped to +-0.33, zeroed below 0.6 m/s (row 0 stops, row 1
    turns at 0.4 1/m); R1's rule (neither) gives other labels for the same trajectories."""
    t, _ = a2
    args = (
        t["train.ego_history_xyz"],
        t["train.ego_history_rot"],
        t["train.ego_future_xyz"],
        t["train.ego_future_rot"],
    )
    action = UnicycleActionSpace(TINY_2S.action_space).traj_to_action(*args)
    assert (
        action[..., 0] - t["train.action"][..., 0]
    ).abs().max() < 1e-3  # accel, as in test_reference_parity
    assert (action[..., 1] - t["train.action"][..., 1]).abs().max() < 1e-3
    r1 = UnicycleActionSpace(
        dataclasses.replace(TINY_2S.action_space, target_low_speed_mps=0.0, clamp_target_curvature=False)
    )
    assert (r1.traj_to_action(*args)[..., 1] - t["train.action"][..., 1]).abs().max() > 1.0
