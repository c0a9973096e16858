"""The real-checkpoint path (local Alpamayo-R1 folder + tokenizer) exercised on a small fake release.

The folder has the released layout: config.json (model_type alpamayo_r1), sharded safetensors with an
index, ``vlm.*`` and head keys, and tokenizer files. Dimensions are tiny but images, cameras and
frames are the real ones (4 x 4 frames of 320 x 576), so the prompt has the real geometry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from alpamayo_cache.config import from_checkpoint_config
from alpamayo_cache.errors import UserError
from alpamayo_cache.evaluate import EvalConfig
from alpamayo_cache.evaluate import run as evaluate
from alpamayo_cache.model.head import init_head
from alpamayo_cache.model.prompt import PromptBuilder
from alpamayo_cache.model.tokenizer import build_tiny_tokenizer
from alpamayo_cache.model.vlm import FrozenVLM, build_vlm
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train import TrainConfig
from alpamayo_cache.train import run as train
from tests.conftest import precompute_cfg

CONFIG = {
    "model_type": "alpamayo_r1",
    "vocab_size": 1296,
    "traj_token_start_idx": 263,
    "traj_vocab_size": 1000,
    "expert_non_causal_attention": True,
    "text_config": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "deepstack_visual_indexes": [0],
        "num_position_embeddings": 64,
    },
    "expert_cfg": {"hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 4, "head_dim": 16},
    "action_in_proj_cfg": {"hidden_size": 32, "num_enc_layers": 2},
}


def make_release(folder: Path, drop_vlm_key: bool = False) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    cfg = from_checkpoint_config(folder)
    tok = build_tiny_tokenizer(cfg)
    tok.save_pretrained(str(folder))
    vlm = build_vlm(cfg, PromptBuilder(tok, cfg).ids, None, torch.float32, "cpu")
    vlm_state = {f"vlm.{k}": v.contiguous() for k, v in vlm.state_dict().items()}
    if drop_vlm_key:
        vlm_state.pop(sorted(vlm_state)[3])
    head_state = {k: v.contiguous() for k, v in init_head(cfg).state_dict().items()}
    save_file(vlm_state, str(folder / "model-00001-of-00002.safetensors"))
    save_file(head_state, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in vlm_state}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in head_state})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release") / "Alpamayo-R1-small"
    make_release(folder)
    return folder


def test_folder_vlm_matches_the_weights_it_was_saved_from(release):
    cfg = from_checkpoint_config(release)
    assert cfg.image_size == (320, 576) and cfg.frames_per_camera == 4 and len(cfg.cameras) == 4
    loaded = FrozenVLM(cfg, release, None, "cpu", torch.float32)
    reference = build_vlm(cfg, loaded.prompt.ids, None, torch.float32, "cpu")
    images = np.random.default_rng(0).integers(0, 255, (4, 4, 320, 576, 3), dtype=np.uint8)
    history = np.cumsum(np.full((16, 3), [0.8, 0.0, 0.0]), axis=0) - 12.8
    enc = loaded.encode(images, history, "traj-only")
    loaded.model = reference
    ref = loaded.encode(images, history, "traj-only")
    assert torch.equal(enc.keys, ref.keys) and torch.equal(enc.hidden, ref.hidden)
    # The real prompt geometry: 16 images of 320 x 576 -> 180 tokens each on 18 MRoPE positions.
    assert enc.rope_delta == -2592
    assert enc.length == 16 * 182 + len(loaded.prompt.build([], history, "traj-only"))


def test_precompute_train_eval_from_a_release_folder(release, synthetic_data, tmp_path):
    store = tmp_path / "store"
    result = precompute(precompute_cfg(synthetic_data, store, model=str(release), limit=3, val_percent=50))
    assert result.written == 3
    reader = StoreReader(store)
    assert reader.info.model_identity.startswith("folder:")
    assert all(i.rope_delta == -2592 for i in reader.sample_infos().values())
    run_dir = tmp_path / "run"
    train(TrainConfig(store=store, run_dir=run_dir, init=str(release), steps=2, device="cpu"))
    with pytest.raises(UserError, match="pass --init"):
        train(TrainConfig(store=store, run_dir=tmp_path / "run2", steps=1, device="cpu"))
    metrics = evaluate(
        EvalConfig(
            store=store,
            baseline=str(release),
            checkpoints=(str(run_dir),),
            split="all",
            device="cpu",
            plots=False,
            num_samples=2,
        )
    )
    assert metrics["models"]["baseline"] == str(release)


def test_release_with_a_missing_vlm_weight_is_refused(tmp_path):
    folder = tmp_path / "broken"
    make_release(folder, drop_vlm_key=True)
    cfg = from_checkpoint_config(folder)
    with pytest.raises(UserError, match="VLM missing key"):
        FrozenVLM(cfg, folder, None, "cpu", torch.float32)
