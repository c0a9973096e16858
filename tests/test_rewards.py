"""Reward functions on hand-made cases: camera projection, each reward, the trust gate, the combination."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alpamayo_cache.errors import UserError
from alpamayo_cache.rewards import (
    REWARDS,
    CameraView,
    Candidates,
    RewardConfig,
    RewardContext,
    score,
    trust_weight,
)
from alpamayo_cache.rewards.reasoning import intentions, names_danger
from alpamayo_cache.rewards.visual import corridor_mask

W, DT = 64, 0.1
STORED_HW = (180, 320)  # 1/6 of the native 1080x1920

# A hand-made f-theta front camera (native 1920x1080) 1.6 m ahead of the rear axle, 1.45 m up, yawed
# 1 deg left and pitched 3 deg down; bw is a degree-4 fit of the inverse of fw over 0..1.4 rad.
FW = [0.0, 905.0, 0.0, -16.0, -2.5]
BW = [
    7.627687766476043e-05,
    0.0011031404476505387,
    9.752632490928335e-09,
    5.168357785929185e-12,
    1.7327427880626942e-14,
]
CX, CY = 955.3, 545.7
PITCHED_QUAT = [0.5173735959294461, -0.5084216167281896, 0.4824740992269451, -0.49096921029090607]
# Optical axis along rig x: optical (x right, y down, z forward) -> rig (x forward, y left, z up).
LEVEL_QUAT = [0.5, -0.5, 0.5, -0.5]
MOUNT = [1.6, 0.02, 1.45]
# Fixture: the release's project_waypoints_ftheta (alpamayo src/alpamayo_r1/visualization/viz.py:27),
# run in the release venv on the pitched camera above at native resolution, one point at a time.
FIXTURE_POINTS = [[x, y, 0.0] for x in (5.0, 10.0, 20.0, 40.0) for y in (-2.0, 0.0, 3.0)] + [
    [30.0, -1.0, 2.5]
]
FIXTURE_UV = [
    [1428.1204587766288, 834.9697018796744],
    [975.084262366815, 862.4361700507834],
    [351.7325685360943, 807.6494078392989],
    [1181.6480525794445, 651.2628747246879],
    [973.0252786615903, 652.997852941085],
    [666.4776222904443, 648.2360273809641],
    [1069.6787378552972, 569.4972803387254],
    [972.0286812280527, 569.4941564714265],
    [826.2136174580065, 569.1268687234373],
    [1018.6095495477492, 532.5305570454767],
    [971.5554216928933, 532.4783162067549],
    [901.0441694017284, 532.4470930707223],
    [1003.6066440844014, 464.9363958002368],
]


def camera(quat=PITCHED_QUAT, hw=STORED_HW) -> CameraView:
    intr = {"width": 1920, "height": 1080, "cx": CX, "cy": CY}
    intr |= {f"fw_poly_{i}": v for i, v in enumerate(FW)} | {f"bw_poly_{i}": v for i, v in enumerate(BW)}
    return CameraView(intr, tuple(quat), tuple(MOUNT), hw)


def unicycle(v0: float, accel, curvature) -> Candidates:
    """K trajectories from controls [K, w], integrated like the action space (trapezoidal positions)."""
    k = max(np.shape(np.atleast_2d(accel))[0], np.shape(np.atleast_2d(curvature))[0])
    accel = np.broadcast_to(np.atleast_2d(accel), (k, W)).astype(np.float64)
    curvature = np.broadcast_to(np.atleast_2d(curvature), (k, W)).astype(np.float64)
    speed = np.concatenate([np.full((len(accel), 1), v0), v0 + np.cumsum(accel * DT, axis=1)], axis=1)
    turn = curvature * (speed[:, :-1] * DT + 0.5 * accel * DT**2)
    heading = np.concatenate([np.zeros((len(accel), 1)), np.cumsum(turn, axis=1)], axis=1)
    vx, vy = speed * np.cos(heading), speed * np.sin(heading)
    x = np.cumsum(0.5 * DT * (vx[:, :-1] + vx[:, 1:]), axis=1)
    y = np.cumsum(0.5 * DT * (vy[:, :-1] + vy[:, 1:]), axis=1)
    xyz = np.stack([x, y, np.zeros_like(x)], axis=-1)
    return Candidates.from_controls(xyz, accel, curvature, v0)


def history(v0: float) -> np.ndarray:
    t = np.arange(-15, 1) * DT
    return np.stack([v0 * t, np.zeros(16), np.zeros(16)], axis=-1)


def context(gt: Candidates, text: str = "", image=None, cam=None) -> RewardContext:
    return RewardContext(gt.xyz[0], history(float(gt.speed[0, 0])), text, image, cam)


def asphalt(seed: int = 0) -> np.ndarray:
    """Grey road with faint sensor noise (std 1.5 grey levels)."""
    rng = np.random.default_rng(seed)
    base = np.array([92.0, 92.0, 96.0]) + rng.normal(0.0, 1.5, (*STORED_HW, 1))
    return np.clip(base, 0, 255).round().astype(np.uint8)


# -- camera model --------------------------------------------------------------------------------
def test_projection_matches_release_fixture_at_native_and_stored_size():
    uv, ok = camera(hw=(1080, 1920)).project(np.array(FIXTURE_POINTS))
    assert ok.all()
    np.testing.assert_allclose(uv, FIXTURE_UV, atol=1e-4)
    uv, ok = camera().project(np.array(FIXTURE_POINTS))
    # align_corners=False resize, pixel i covering [i, i+1): native u -> u * 320 / 1920
    np.testing.assert_allclose(uv, np.array(FIXTURE_UV) / 6, atol=1e-5)


def test_point_straight_ahead_lands_on_the_principal_point():
    cam = camera(LEVEL_QUAT)
    uv, ok = cam.project(
        np.array([[50.0, MOUNT[1], MOUNT[2]], [80.0, MOUNT[1] + 0.3, MOUNT[2]], [-5.0, 0, 0]])
    )
    pp = [CX / 6, CY / 6]
    np.testing.assert_allclose(uv[0], pp, atol=1e-9)  # exactly on the optical axis
    assert np.abs(uv[1] - pp).max() < 1.0 and uv[1][0] < pp[0]  # a bit to the left: smaller u
    assert ok.tolist() == [True, True, False]  # behind the lens: invalid


def test_camera_record_round_trips_through_json_and_rejects_bad_records():
    cam = camera()
    again = CameraView.from_dict(json.loads(json.dumps(cam.to_dict())))
    assert again == cam
    np.testing.assert_array_equal(
        again.project(np.array(FIXTURE_POINTS))[0], cam.project(np.array(FIXTURE_POINTS))[0]
    )
    bad = cam.to_dict()
    del bad["intrinsics"]["bw_poly_3"]
    with pytest.raises(UserError, match="bw_poly_3"):
        CameraView.from_dict(bad)
    with pytest.raises(UserError, match="malformed"):
        CameraView.from_dict({"intrinsics": cam.intrinsics})
    with pytest.raises(UserError, match="unit length"):
        CameraView.from_dict(cam.to_dict() | {"rotation_xyzw": [0.0, 0.0, 0.0, 2.0]})


# -- registry ------------------------------------------------------------------------------------
def test_registry_lists_the_four_rewards_and_all_stay_in_unit_range():
    assert set(REWARDS) == {"gt_similarity", "comfort", "reasoning_agreement", "visual_safety"}
    rng = np.random.default_rng(1)
    cand = unicycle(7.0, rng.normal(0, 2, (5, W)), rng.normal(0, 0.05, (5, W)))
    ctx = context(unicycle(7.0, 0.0, 0.0), "Turn right and slow down.", asphalt(), camera())
    for name, fn in REWARDS.items():
        values = fn(ctx, cand)
        assert values.shape == (5,) and ((values >= 0) & (values <= 1)).all(), name


# -- gt similarity -------------------------------------------------------------------------------
def test_gt_similarity_is_one_on_the_ground_truth_and_exp_minus_offset_elsewhere():
    gt = unicycle(8.0, 0.2, 0.01)
    ctx = context(gt)
    shifted = [gt.xyz[0] + np.array(offset) for offset in ([0, 1.0, 0], [3.0, 4.0, 0], [0, 0, 7.0])]
    cand = Candidates.from_xyz(np.stack([gt.xyz[0], *shifted]), v0=8.0)
    # mean XY displacement: 0, 1 m, 5 m, and 0 (z is ignored)
    np.testing.assert_allclose(REWARDS["gt_similarity"](ctx, cand), [1.0, math.exp(-1), math.exp(-5), 1.0])
    np.testing.assert_allclose(REWARDS["gt_similarity"](ctx, cand, scale=5.0)[2], math.exp(-1))


# -- comfort -------------------------------------------------------------------------------------
def test_comfort_penalises_jerk_and_lateral_acceleration():
    smooth = unicycle(10.0, 0.5, 0.01)  # a_lat <= 13.2^2 * 0.01 = 1.74 m/s^2, jerk 0
    jerky = unicycle(10.0, np.where(np.arange(W) % 2 == 0, 1.5, -1.5)[None], 0.0)  # |jerk| 30 m/s^3
    fast_bend = unicycle(15.0, 0.0, 0.02)  # a_lat = 4.5 m/s^2 throughout
    cand = smooth.concat(jerky).concat(fast_bend)
    values = REWARDS["comfort"](context(smooth), cand)
    np.testing.assert_allclose(values, [1.0, 0.5, 0.5 + 0.5 * (4.89 - 4.5) / (4.89 - 2.0)], atol=1e-12)


def test_finite_difference_controls_of_a_logged_trajectory():
    arc = unicycle(8.0, 0.0, 0.02)
    fd = Candidates.from_xyz(arc.xyz, v0=8.0)
    np.testing.assert_allclose(fd.speed, 8.0, rtol=1e-3)
    np.testing.assert_allclose(fd.curvature[:, 1:], 0.02, rtol=1e-3)  # the first step starts at heading 0
    np.testing.assert_allclose(fd.heading_change(), arc.heading_change(), rtol=0.02)
    assert REWARDS["comfort"](context(arc), fd)[0] == pytest.approx(1.0)


# -- reasoning agreement -------------------------------------------------------------------------
def test_reasoning_turn_left_agrees_with_a_left_turn_only():
    cand = unicycle(5.0, 0.0, np.array([[0.05], [-0.05], [0.0]]))  # left 1.6 rad, right, straight
    fn = REWARDS["reasoning_agreement"]
    ctx = context(cand, "A car is parked ahead, so I turn left at the intersection.")
    np.testing.assert_allclose(fn(ctx, cand), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(fn(context(cand, ""), cand), 0.5)
    np.testing.assert_allclose(fn(context(cand, "The sky is blue."), cand), 0.5)
    np.testing.assert_allclose(fn(context(cand, "Do not turn left; keep straight."), cand), [0.0, 0.0, 1.0])


def test_reasoning_stop_and_slow_down_follow_the_final_speed():
    braking = unicycle(8.0, np.where(np.arange(W) < 40, -0.2, 0.0)[None] * 10, 0.0)  # 8 -> 0 m/s in 4 s
    cruising = unicycle(8.0, 0.0, 0.0)
    cand = braking.concat(cruising)
    fn = REWARDS["reasoning_agreement"]
    np.testing.assert_allclose(fn(context(cand, "Pedestrian crossing: stop."), cand), [1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(fn(context(cand, "Yield to the cyclist."), cand), [1.0, 0.0], atol=1e-9)
    assert intentions("Stop sign ahead, the stop line is far.") == []
    assert intentions("Change lanes to the left, then accelerate.") == ["lane_left", "accelerate"]
    assert names_danger("Rocks and debris on the road", ["rock"]) and not names_danger(
        "There is no debris.", ["debris"]
    )


# -- visual safety -------------------------------------------------------------------------------
def test_visual_safety_rough_or_colour_odd_ground_scores_lower_than_asphalt():
    cam, path = camera(), unicycle(8.0, 0.0, 0.0)
    mask = corridor_mask(cam, path.xyz[0])
    rows = np.nonzero(mask.any(axis=1))[0]
    assert mask.sum() > 2000 and rows.max() == STORED_HW[0] - 1  # the corridor reaches the bottom edge
    cols = np.nonzero(mask[-1])[0]
    assert abs(cols.mean() + 0.5 - CX / 6) < 6  # ... centred below the camera
    centre = np.nonzero(mask)[1].mean()
    patch = mask & (np.arange(STORED_HW[1])[None, :] < centre)  # the left half of the corridor
    rng = np.random.default_rng(2)
    rough = asphalt().astype(np.float64)
    rough[patch] += rng.normal(0.0, 35.0, (int(patch.sum()), 1))
    rough = np.clip(rough, 0, 255).round().astype(np.uint8)
    mud = asphalt()
    mud[patch] = (118, 84, 46)  # brown, as smooth as asphalt
    fn = REWARDS["visual_safety"]
    uniform = np.full((*STORED_HW, 3), 90, np.uint8)
    assert fn(context(path, image=uniform, cam=cam), path)[0] == 1.0  # no texture, one colour
    smooth = fn(context(path, image=asphalt(), cam=cam), path)[0]
    odd_texture = fn(context(path, image=rough, cam=cam), path)[0]
    odd_colour = fn(context(path, image=mud, cam=cam), path)[0]
    assert smooth > 0.88 and odd_texture < 0.3 and odd_colour < 0.7
    assert smooth - odd_colour > 0.2


def test_visual_safety_is_neutral_without_image_or_visible_path():
    path = unicycle(8.0, 0.0, 0.0)
    reverse = Candidates.from_controls(-path.xyz, path.accel, path.curvature, 8.0)  # behind the camera
    standing = unicycle(0.0, 0.0, 0.0)
    cand = path.concat(reverse).concat(standing)
    fn = REWARDS["visual_safety"]
    np.testing.assert_array_equal(fn(context(path), cand), 0.5)
    values = fn(context(path, image=asphalt(), cam=camera()), cand)
    assert values[0] > 0.88 and values[1:].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="camera record"):
        context(path, image=np.zeros((90, 160, 3), np.uint8), cam=camera())


# -- combination and trust gate ------------------------------------------------------------------
def test_trust_gate_switches_exactly_at_the_threshold():
    cfg = RewardConfig()
    text = "Debris on the road ahead."
    assert trust_weight(text, 0.3, cfg) == 1.0
    assert trust_weight(text, math.nextafter(0.3, 0.0), cfg) == 0.1
    assert trust_weight("The road is clear.", 0.0, cfg) == 1.0
    assert trust_weight("There is no debris.", 0.0, cfg) == 1.0
    assert trust_weight("Watch the sinkhole.", 0.0, RewardConfig(danger_keywords=("sinkhole",))) == 0.1


def _rocky_scene() -> tuple[RewardContext, Candidates, Candidates]:
    """Logged path straight over a rough patch from 12 m on; a sample swerving right avoids it."""
    cam, logged = camera(), unicycle(8.0, 0.0, 0.0)
    image = asphalt()
    horizon_row = cam.project(np.array([[12.0, 0.0, 0.0]]))[0][0, 1]
    mask = corridor_mask(cam, logged.xyz[0]) & (np.arange(STORED_HW[0])[:, None] < horizon_row)
    rng = np.random.default_rng(3)
    noisy = image[mask].astype(np.float64) + rng.normal(0.0, 70.0, (int(mask.sum()), 3))
    image[mask] = np.clip(noisy, 0, 255).round().astype(np.uint8)
    swerve = unicycle(8.0, 0.0, np.where(np.arange(W) < 8, -0.08, 0.0)[None])
    cand = swerve.concat(unicycle(8.0, 0.0, 0.001))
    ctx = RewardContext(logged.xyz[0], history(8.0), "Rocks on the road ahead, steer right.", image, cam)
    return ctx, cand, logged


def test_score_distrusts_the_logged_trajectory_over_a_named_hazard():
    ctx, cand, logged = _rocky_scene()
    result = score(ctx, cand, logged=logged)
    assert result.danger and result.gt_terms["visual_safety"] < 0.3 < result.terms["visual_safety"][0]
    assert result.trust == 0.1 and result.gt_weight == pytest.approx(0.05)
    assert result.best == 0 and not result.gt_is_best
    expected = 1.5 * result.terms["visual_safety"] + 0.05 * result.terms["gt_similarity"]
    expected = expected + 0.3 * result.terms["reasoning_agreement"]
    np.testing.assert_allclose(result.total, expected)
    # The gate at the threshold, end to end: safety == threshold trusts, just above it does not.
    at = result.gt_terms["visual_safety"]
    assert score(ctx, cand, RewardConfig(safety_threshold=at), logged).trust == 1.0
    assert score(ctx, cand, RewardConfig(safety_threshold=math.nextafter(at, 1.0)), logged).trust == 0.1


def test_logged_trajectory_is_best_when_nothing_argues_against_it():
    gt = unicycle(8.0, 0.0, 0.01)
    cand = unicycle(8.0, 0.0, np.array([[0.0], [0.02]]))
    result = score(context(gt, "Follow the lane."), cand)  # logged controls by finite differences
    assert result.trust == 1.0 and not result.danger and result.gt_is_best
    assert result.gt_terms["gt_similarity"] == pytest.approx(1.0)
    assert result.total.shape == (2,) and set(result.terms) == set(REWARDS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w_safety": -1.0}, "w_safety"),
        ({"w_safety": 0.0, "w_gt": 0.0, "w_reasoning": 0.0}, "all 0"),
        ({"gt_trust_min": 0.8, "gt_trust_max": 0.5}, "swap"),
        ({"safety_threshold": 1.5}, "safety_threshold"),
        ({"gt_scale_m": 0.0}, "gt_scale_m"),
        ({"danger_keywords": ("mud", "")}, "danger_keywords"),
    ],
)
def test_reward_config_rejects_out_of_range_values(kwargs, message):
    with pytest.raises(UserError, match=message):
        RewardConfig(**kwargs)
    assert RewardConfig(danger_keywords=["Mud"]).danger_keywords == ("mud",)
