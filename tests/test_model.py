"""Presets, parameter counts, and loading/saving the head weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from alpamayo_cache.config import REAL, TINY, from_checkpoint_config, resolve_model
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import count_parameters
from alpamayo_cache.model.head import init_head, load_head
from alpamayo_cache.model.policy import Policy
from alpamayo_cache.model.weights import load_released, read_head_tensors, save_tensors
from alpamayo_cache.options import apply_overrides


def test_real_parameter_counts_on_meta_device():
    with torch.device("meta"):
        head = Policy(REAL)
    assert count_parameters(head.expert) == 2_279_238_656
    assert count_parameters(head.action_in_proj) == 1_349_632
    assert count_parameters(head.action_out_proj) == 4_098
    assert not hasattr(head.expert, "embed_tokens")
    assert len(head.expert.layers) == 36


def test_tiny_init_is_seeded():
    a, b = init_head(TINY), init_head(TINY)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_overrides_and_roundtrip():
    cfg = apply_overrides(TINY, ["expert.hidden_size=32", "frames_per_camera=3"])
    assert cfg.expert.hidden_size == 32 and cfg.frames_per_camera == 3
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="has no field"):
        apply_overrides(TINY, ["expert.nope=1"])


def _fake_release(folder, head):
    """A released-layout folder: config.json, a VLM shard that must never be read, a head shard."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "alpamayo_r1",
                "vlm_config": {"text_config": {"num_hidden_layers": TINY.text.num_layers}},
                "expert_cfg": {"hidden_size": TINY.expert.hidden_size},
            }
        )
    )
    head_state = {k: v.clone() for k, v in head.state_dict().items()}
    save_file(head_state, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file: reading it fails")
    weight_map = {"vlm.model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in head_state})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return head_state


def test_load_released_reads_only_head_shards(tmp_path):
    source = init_head(TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    state = _fake_release(tmp_path / "ckpt", source)
    tensors = read_head_tensors(tmp_path / "ckpt")
    assert set(tensors) == set(state)
    target = init_head(TINY)
    load_released(target, tmp_path / "ckpt")
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_checkpoint_config_is_read(tmp_path):
    _fake_release(tmp_path / "ckpt", init_head(TINY))
    cfg = from_checkpoint_config(tmp_path / "ckpt")
    assert cfg.text.num_layers == TINY.text.num_layers and cfg.expert.hidden_size == TINY.expert.hidden_size


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        read_head_tensors(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="model_type 'llama'"):
        read_head_tensors(tmp_path)
    head = init_head(TINY)
    path = tmp_path / "head.safetensors"
    save_tensors(path, head.state_dict())
    from alpamayo_cache.model.weights import load_head_file, load_into

    tensors, _ = load_head_file(path)
    missing = dict(tensors)
    missing.pop("action_out_proj.bias")
    with pytest.raises(UserError, match="missing key 'action_out_proj.bias'"):
        load_into(init_head(TINY), missing, "x")
    wrong = dict(tensors)
    wrong["action_out_proj.bias"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"shape \(3,\)"):
        load_into(init_head(TINY), wrong, "x")
    extra = dict(tensors)
    extra["expert.layers.99.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="another architecture"):
        load_into(init_head(TINY), extra, "x")
    with pytest.raises(UserError, match="neither a preset"):
        resolve_model("no-such-thing")


def test_run_checkpoint_roundtrip(tmp_path):
    head = init_head(TINY)
    with torch.no_grad():
        head.action_out_proj.bias.fill_(0.25)
    path = tmp_path / "ckpt.safetensors"
    only = {k: v for k, v in head.state_dict().items() if k.startswith("action_out_proj.")}
    save_tensors(path, only, meta={"model_config": TINY.to_dict(), "base": "tiny"})
    loaded, cfg, _ = load_head(str(path))
    assert cfg == TINY
    assert torch.equal(loaded.action_out_proj.bias, torch.full((2,), 0.25))
    assert torch.equal(loaded.expert.norm.weight, init_head(TINY).expert.norm.weight)


def test_tokenizer_extension_follows_the_release_order():
    from alpamayo_cache.model.tokenizer import ALPAMAYO_SPECIALS, QWEN_SPECIALS, build_tiny_tokenizer

    assert len(ALPAMAYO_SPECIALS) == 28 and len(set(ALPAMAYO_SPECIALS)) == 28
    assert REAL.traj_token_start_idx + REAL.traj_vocab_size + len(ALPAMAYO_SPECIALS) == REAL.text.vocab_size
    tok = build_tiny_tokenizer(TINY)
    base = 256 + len(QWEN_SPECIALS)
    assert tok.convert_tokens_to_ids("<i0>") == base == TINY.traj_token_start_idx
    assert tok.convert_tokens_to_ids(f"<i{TINY.traj_vocab_size - 1}>") == base + TINY.traj_vocab_size - 1
    assert tok.convert_tokens_to_ids(ALPAMAYO_SPECIALS) == list(range(base + TINY.traj_vocab_size, len(tok)))
    assert len(tok) <= TINY.text.vocab_size
