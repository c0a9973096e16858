"""Releases as configuration: the presets, reading each release's config.json, the 2 Super key names,
bf16-rebuilt buffers, stores of one release refused by another, camera sets by id, the preset plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from alpamayo_cache.cli import app
from alpamayo_cache.config import (
    ALPAMAYO_2_SUPER,
    ALPAMAYO_15,
    PRESETS,
    REAL,
    TINY,
    TINY_2S,
    TINY_15,
    resolve_model,
)
from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.data.samples import camera_set
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.action_space import effective_stats
from alpamayo_cache.model.head import init_head
from alpamayo_cache.model.policy import Policy
from alpamayo_cache.model.weights import load_released, to_release_keys
from alpamayo_cache.store import format as F
from alpamayo_cache.store.writer import open_or_create
from alpamayo_cache.train.plan import GIB, head_parameter_count
from alpamayo_cache.train.preset_plan import estimate_prefix_len, preset_plan, vlm_parameter_count
from alpamayo_cache.train.setup import check_head_matches_store

runner = CliRunner()


def test_presets_differ_only_where_the_releases_do():
    assert set(PRESETS) == {
        "alpamayo-r1-10b",
        "tiny",
        "alpamayo-1.5-10b",
        "tiny-1.5",
        "alpamayo-2-super",
        "tiny-2super",
    }
    same = dataclasses.replace(
        ALPAMAYO_15, name=REAL.name, **REAL.prompt_signature(), buffers_from_config=False
    )
    assert (
        dataclasses.replace(same, action_in_proj=REAL.action_in_proj, action_space=REAL.action_space) == REAL
    )
    assert ALPAMAYO_2_SUPER.expert_layers == 64 and ALPAMAYO_2_SUPER.history_tokens == 45
    assert [c.split("_")[1] for c in ALPAMAYO_2_SUPER.cameras] == [
        "cross",
        "front",
        "cross",
        "rear",
        "rear",
        "front",
    ]
    assert TINY_2S.expert_layers == 2 < TINY_2S.text.num_layers
    with pytest.raises(UserError, match="head_dim"):
        dataclasses.replace(TINY, expert=dataclasses.replace(TINY.expert, head_dim=8))
    with pytest.raises(UserError, match="history_tokens"):
        dataclasses.replace(TINY, history_tokens=47)


def test_2super_parameter_counts_on_meta_device():
    with torch.device("meta"):
        head = Policy(ALPAMAYO_2_SUPER)
    counts = head_parameter_count(ALPAMAYO_2_SUPER)
    assert sum(p.numel() for p in head.expert.parameters()) == counts["expert"]
    assert sum(p.numel() for p in head.action_in_proj.parameters()) == counts["action_in_proj"]
    assert len(head.expert.layers) == 64 and head.expert.config.hidden_size == 1536
    assert 2.40e9 < sum(counts.values()) < 2.45e9  # "2.3B" on the card, 2.42 B from these dims
    assert 32e9 < vlm_parameter_count(ALPAMAYO_2_SUPER) < 34e9  # ~66 GB bf16 (3P: 71.6 GB with the expert)
    assert 8.6e9 < vlm_parameter_count(REAL) < 8.9e9  # REFERENCE: 8.80 B


def test_bf16_rebuilt_buffers_take_the_releases_values():
    """Measured with the releases loaded in bf16 (releases_facts §3)."""
    head = Policy(dataclasses.replace(TINY_15, action_in_proj=ALPAMAYO_15.action_in_proj))
    freqs = head.action_in_proj.timestep_fourier_encoder.freqs[0].tolist()
    assert freqs == [1, 1.671875, 2.78125, 4.65625, 7.75, 12.9375, 21.5, 36, 60, 100]
    stats = effective_stats(ALPAMAYO_15.action_space)
    assert (stats.accel_mean, stats.accel_std) == (0.029052734375, 0.6796875)
    assert (stats.curvature_mean, stats.curvature_std) == (0.0002689361572265625, 0.026123046875)
    assert effective_stats(REAL.action_space) == REAL.action_space


def _write_config(folder, cfg: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))


def test_15_folder_is_detected(tmp_path):
    _write_config(tmp_path / "a15", {"model_type": "alpamayo1_5", "action_space_cfg": {"accel_mean": 0.03}})
    cfg = resolve_model(str(tmp_path / "a15"))
    assert cfg.prompt_signature() == ALPAMAYO_15.prompt_signature() and cfg.buffers_from_config
    assert cfg.action_space.accel_mean == 0.03 and cfg.action_space.stats_dtype == "bf16"


def _super_config(hist48: bool) -> dict:
    text = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rope_scaling": {"mrope_section": [4, 2, 2]}}  # fmt: skip
    llm = dict(text, hidden_size=48, intermediate_size=64, num_hidden_layers=2)
    return {
        "model_type": "alpamayo2_super",
        "vlm_config": {"text_config": text, "vision_config": {"depth": 2, "hidden_size": 32}},
        "expert_config": {"llm_config": llm, "action_in_proj_cfg": {"hidden_size": 32}},
        "hist_traj_tokenizer_cfg": {"pad_origin_at_beginning": hist48},
        "traj_ids": {"history_id0": 263, "future_id0": 1263},
        "history_vocab_size": 1000,
        "future_vocab_size": 3000,
        "include_camera_ids": True,
        "frame_label": "frame_num",
    }


def test_2super_folder_loads_its_expert_prefixed_keys(tmp_path):
    folder = tmp_path / "a2"
    _write_config(folder, _super_config(hist48=False))
    cfg = resolve_model(str(folder))
    assert (cfg.expert_layers, cfg.text.num_layers, cfg.expert.hidden_size) == (2, 4, 48)
    assert cfg.history_tokens == 45 and cfg.head_key_prefix == "expert." and cfg.hist_token_offset == 0
    source = init_head(dataclasses.replace(TINY_2S, init_seed=7))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(".freqs")}  # rebuilt from config
    released = to_release_keys(state, "expert.")
    released["expert.action_space.accel_mean"] = torch.tensor(9.0)  # ignored: stats come from config.json
    released["vlm.model.embed_tokens.weight"] = torch.zeros(2)  # never read
    assert any(k.startswith("expert.expert.layers.1.") for k in released)
    save_file(released, str(folder / "model.safetensors"))
    target = init_head(cfg)
    load_released(target, folder)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(UserError, match="kv-heads"):
        bad = _super_config(True)
        bad["expert_config"]["llm_config"]["num_key_value_heads"] = 4
        _write_config(tmp_path / "bad", bad)
        resolve_model(str(tmp_path / "bad"))


def test_a_store_of_one_release_is_refused_by_another(tmp_path):
    def info(model) -> F.StoreInfo:
        fp = F.StoreInfo.compute_fingerprint("preset", model.to_dict(), "traj-only", "fp32", "fp32")
        return F.StoreInfo(
            F.LAYOUT_VERSION, model.name, "preset", model.to_dict(), "traj-only", "fp32", "fp32", "sdpa", fp
        )

    open_or_create(tmp_path / "s", info(TINY))
    with pytest.raises(UserError) as err:
        open_or_create(tmp_path / "s", info(TINY_15))
    assert "\n" not in str(err.value) and "tiny-1.5" in str(err.value)
    for head, store in ((TINY_15, TINY), (TINY, TINY_15), (TINY_2S, TINY_15)):
        with pytest.raises(UserError) as err:
            check_head_matches_store(head, store, f"preset {head.name}")
        message = str(err.value)
        assert "\n" not in message and f"made for {store.release}" in message, message
    check_head_matches_store(TINY_15, TINY_15, "same")


def test_camera_sets_by_release_id():
    chosen = camera_set("cameras:6+camera_front_wide_120fov+0", TINY_15.cameras).cameras
    assert chosen == ("camera_cross_left_120fov", "camera_front_wide_120fov", "camera_front_tele_30fov")
    assert len(camera_set("cameras:0+1+2+3+4+5+6", TINY_15.cameras).cameras) == 7
    for bad in ("cameras:9", "cameras:1+1", "cameras:"):
        with pytest.raises(UserError):
            camera_set(bad, TINY_15.cameras)


def test_2super_plan_from_the_preset_fits_24_gib():
    assert estimate_prefix_len(REAL) == 2997  # measured R1 traj-only prefix: 2,993
    assert estimate_prefix_len(ALPAMAYO_2_SUPER) == 4576
    plan = preset_plan(TrainConfig(dry_run=True, model="alpamayo-2-super"))
    assert plan.memory.kv_batch == 4 * 4576 * 262_144  # micro-batch 4 x L x 64 x 2 x 8 x 128 x 2 B
    assert plan.memory.optimizer == sum(head_parameter_count(ALPAMAYO_2_SUPER).values()) * 2  # 8-bit AdamW
    assert plan.memory.total < 24 * GIB
    result = runner.invoke(app, ["train", "--dry-run", "--model", "alpamayo-2-super"])
    assert result.exit_code == 0, result.output
    assert "verdict: GPU memory fits 24 GiB" in result.output and "precompute needs the VLM" in result.output
    small = runner.invoke(app, ["train", "--dry-run", "--model", "alpamayo-2-super", "--gpu-memory-gb", "12"])
    assert small.exit_code == 2 and "more than --gpu-memory-gb 12" in small.output
    assert runner.invoke(app, ["train", "--model", "alpamayo-2-super"]).exit_code == 2  # needs --dry-run
