"""Co-training the VLM's top layers: --vlm-from-layer stores, exact recompute, train/eval, plan.

Exactness is pinned bitwise in fp32: the K/V that VLMTop recomputes from the stored hidden states
equal the K/V of the VLM's own full forward, so a baseline (or an expert-only run) predicts exactly the
same trajectories from a k-store as from a full store of the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from alpamayo_cache.config import REAL, TINY, from_checkpoint_config
from alpamayo_cache.configs import EvalConfig, ExportConfig, TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.evaluate import predict
from alpamayo_cache.evaluate import run as evaluate
from alpamayo_cache.export import from_release
from alpamayo_cache.export import run as export
from alpamayo_cache.model.expert import Prefix, PromptStates
from alpamayo_cache.model.head import init_head, load_head
from alpamayo_cache.model.vlm import FrozenVLM, build_vlm
from alpamayo_cache.model.vlm_top import VLM_LAYERS, VLMTop, _preset_tensors, attach, make_trainable
from alpamayo_cache.model.weights import load_head_file, read_tensors
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.runtime import log
from alpamayo_cache.store import format as F
from alpamayo_cache.store.dataset import CachedFeatures, collate
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train import run as train
from alpamayo_cache.train.checkpoints import latest_checkpoint
from alpamayo_cache.train.plan import GIB, plan_for, vlm_layer_parameter_count, vlm_top_trainable_count
from tests.conftest import precompute_cfg

PAD_IDS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
K = 1  # the tiny preset has 2 text layers and one deepstack layer: k = 1 is its only choice


@pytest.fixture(scope="module")
def k_store(synthetic_data, tmp_path_factory):
    """The first clip of the tiny store's data (3 samples), stored with --vlm-from-layer 1."""
    store = tmp_path_factory.mktemp("kstore") / "tiny-k1"
    precompute(precompute_cfg(synthetic_data, store, keyframes="stride:1.5", limit=1, vlm_from_layer=K))
    return store


@pytest.fixture(scope="module")
def top_run(k_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "top"
    cfg = TrainConfig(
        store=k_store, run_dir=run_dir, device="cpu", steps=4, save_every=4, scope="vlm-top", lora_rank=4,
        split="all", val_split="", vlm_lr_scale=3.0,
    )  # fmt: skip
    return train(cfg)


def test_recomputed_kv_equal_the_full_forward_bitwise():
    """4 text layers, k = 1: layers 1 and 2 run whole (K/V as the cache receives them), layer 3 runs
    only up to its K/V. Batched with a shorter, right-padded prompt, each row's K/V stay exact."""
    cfg = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, num_layers=4))
    vlm = FrozenVLM(cfg, None, None, "cpu", torch.float32, from_layer=K)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, cfg.frames_per_camera, *cfg.image_size, 3), dtype=np.uint8)
    enc = vlm.encode(images, rng.normal(size=(16, 3)).astype(np.float32), "traj-only")
    assert enc.prompt_hidden.shape == (enc.length, cfg.text.hidden_size)
    top = VLMTop(cfg, K, _preset_tensors(cfg, K))
    cut = enc.length - 7  # a shorter prompt: causal attention makes its K/V a prefix of the long one's
    hidden = torch.zeros(2, enc.length, cfg.text.hidden_size)
    hidden[0], hidden[1, :cut] = enc.prompt_hidden, enc.prompt_hidden[:cut]
    positions = torch.zeros(3, 2, enc.length, dtype=torch.long)
    positions[:, 0], positions[:, 1, :cut] = enc.position_ids, enc.position_ids[:, :cut]
    with torch.no_grad():
        single = top.kv(PromptStates(enc.prompt_hidden[None], enc.position_ids[:, None]))
        batched = top.kv(PromptStates(hidden, positions))
    assert len(single) == 3
    for j, ((k1, v1), (kb, vb)) in enumerate(zip(single, batched, strict=True)):
        i = K + j
        assert torch.equal(k1[0], enc.keys[i]) and torch.equal(v1[0], enc.values[i]), f"layer {i}"
        assert torch.equal(kb[0], enc.keys[i]) and torch.equal(vb[0], enc.values[i]), f"layer {i} batched"
        assert torch.equal(kb[1, :, :cut], enc.keys[i][:, :cut]), f"layer {i} padded row"


def test_k_inside_the_deepstack_layers_is_refused(synthetic_data, tmp_path):
    for k in (0, 2):
        with pytest.raises(UserError, match="deepstack"):
            precompute(precompute_cfg(synthetic_data, tmp_path / f"s{k}", vlm_from_layer=k))


def test_k_store_layout_and_recompute_match_the_full_store(k_store, tiny_store):
    reader, full = StoreReader(k_store), StoreReader(tiny_store)
    assert reader.info.vlm_from_layer == K and reader.info.stored_layers == K
    assert reader.info.fingerprint != full.info.fingerprint
    sid = reader.select()[0]
    s, f = reader.read(sid), full.read(sid)
    assert s.keys.shape == (K, *f.keys.shape[1:]) and torch.equal(s.keys, f.keys[:K])
    assert s.prompt_hidden.dtype == torch.float32 and s.prompt_hidden.shape == (s.info.length, 64)
    assert s.position_ids.shape == (3, s.info.length) and s.prompt_mask is None
    top = VLMTop(TINY, K, _preset_tensors(TINY, K))
    batch = collate([s])
    with torch.no_grad():
        ((k, v),) = top.kv(Prefix.from_batch(batch).prompt)
    assert torch.equal(k[0], f.keys[K]) and torch.equal(v[0], f.values[K])
    one = F.sample_bytes(s.info.length, 2, 2, 16, "fp32", 64, 4, vlm_from_layer=K)
    on_disk = sum(p.stat().st_blocks * 512 for p in reader.sample_dir(sid).rglob("*"))  # as du counts
    assert abs(one - on_disk) / on_disk < 0.15, (one, on_disk)


def test_baseline_predicts_the_same_from_a_k_store_and_a_full_store(k_store, tiny_store):
    ids = StoreReader(k_store).select()[:3]
    cfg = EvalConfig(store=k_store, num_samples=2, device="cpu")
    preds = []
    for store in (k_store, tiny_store):
        policy, head_cfg, _ = load_head("tiny")
        reader = StoreReader(store)
        policy = attach(policy, "tiny", reader.info, TINY)
        assert (type(policy).__name__ == "CoTrainedPolicy") == (store == k_store)
        preds.append(
            predict(policy, head_cfg, cfg, CachedFeatures(store, ids, reader), "cpu", torch.float32, "x")
        )
    assert np.array_equal(preds[0]["xyz"], preds[1]["xyz"])


def test_vlm_top_trains_the_layers_and_checkpoints_them(top_run, k_store):
    assert len(top_run.losses) == 4 and all(np.isfinite(top_run.losses))
    layers, meta = load_head_file(top_run.checkpoint / VLM_LAYERS)
    assert meta["first_layer"] == K and meta["vlm_identity"] == StoreReader(k_store).info.model_identity
    start = {f"vlm.model.language_model.{k}": v for k, v in _preset_tensors(TINY, K).items()}
    assert set(layers) == set(start)  # every weight of layers k.., release names, LoRA merged
    p = "vlm.model.language_model.layers.1."
    assert not torch.equal(layers[p + "self_attn.k_proj.weight"], start[p + "self_attn.k_proj.weight"])
    for unused in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):  # cannot reach the last layer's K/V
        assert torch.equal(layers[p + unused], start[p + unused])
    state = torch.load(top_run.checkpoint / "trainer_state.pt", weights_only=False)
    assert any(n.startswith("vlm.") and "lora_" in n for n in state["trainable"])
    assert len(state["optimizer"]["param_groups"]) == 2  # --vlm-lr-scale: the VLM layers' own group


def test_vlm_top_on_a_full_store_is_refused(tiny_store, tmp_path):
    with pytest.raises(UserError, match="--vlm-from-layer"):
        train(TrainConfig(store=tiny_store, run_dir=tmp_path / "r", device="cpu", steps=1, scope="vlm-top"))


def test_parameter_counts_match_the_modules():
    top = VLMTop(TINY, K, _preset_tensors(TINY, K))
    assert sum(p.numel() for p in top.layers["1"].parameters()) == vlm_layer_parameter_count(TINY)
    make_trainable(top, "full", 4, 8, 0)
    assert sum(p.numel() for p in top.parameters() if p.requires_grad) == vlm_top_trainable_count(
        TINY, K, "full", 4
    )
    top = VLMTop(TINY, K, _preset_tensors(TINY, K))
    make_trainable(top, "lora", 4, 8, 0)
    assert sum(p.numel() for p in top.parameters() if p.requires_grad) == vlm_top_trainable_count(
        TINY, K, "lora", 4
    )


def test_real_size_plan_for_k27_fits_a_24_gb_card():
    """LoRA on layers 27-35 + the full expert with 8-bit AdamW fits 24 GiB at micro-batch 1 (and 2);
    full layers 27-35 with the full expert do not."""

    def total(micro_batch: int, vlm_train: str, vlm_expert: str = "all") -> float:
        cfg = TrainConfig(
            scope="vlm-top", micro_batch=micro_batch, vlm_train=vlm_train, vlm_expert=vlm_expert
        )
        plan = plan_for(cfg, REAL, 2993, "cuda", "adamw8bit", True, "bf16", vlm_from_layer=27)
        return plan.memory.total / GIB

    assert vlm_layer_parameter_count(REAL) == 192_946_432
    # Disk per sample (L = 2993, bf16): K/V of 27 layers + the hidden states entering layer 27.
    assert F.sample_bytes(2993, 36, 8, 128, "bf16", 4096, 4) == pytest.approx(441.8e6, rel=1e-3)
    assert F.sample_bytes(2993, 36, 8, 128, "bf16", 4096, 4, vlm_from_layer=27) == pytest.approx(
        356.0e6, rel=1e-3
    )
    assert total(1, "lora") < 24 and total(2, "lora") < 24
    assert total(1, "full") > 24
    assert total(1, "full", "lora") < 24


def test_eval_reports_the_centre_gap_for_baseline_expert_only_and_co_trained(
    k_store, tiny_store, top_run, tmp_path
):
    expert_only = tmp_path / "expert-only"
    train(TrainConfig(store=k_store, run_dir=expert_only, device="cpu", steps=4, split="all", val_split=""))
    metrics = evaluate(
        EvalConfig(
            store=k_store, checkpoints=(str(top_run.run_dir), str(expert_only)), split="all", device="cpu",
            plots=False, num_samples=2, bootstrap=50, out_dir=tmp_path / "eval",
        )
    )  # fmt: skip
    overall = metrics["overall"]
    assert list(overall) == ["baseline", "top", "expert-only"]
    for row in overall.values():
        assert row["centre_gap"] == pytest.approx(row["centre_ade"] - row["min_ade"])
    assert overall["top"]["centre_ade"] != overall["expert-only"]["centre_ade"]
    assert "| centre_gap |" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(UserError, match="co-trained the VLM"):  # a full store holds the untrained K/V
        evaluate(EvalConfig(store=tiny_store, checkpoints=(str(top_run.run_dir),), device="cpu", plots=False))


@pytest.fixture(scope="module")
def exported(top_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "Alpamayo-R1-tiny"
    export(ExportConfig(run=top_run.run_dir, to=out, shard_gb=20e-6))  # ~20 kB shards: several of them
    return out


def test_preset_export_is_a_complete_checkpoint(exported, top_run):
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3
    vlm = build_vlm(TINY, {t: 0 for t in PAD_IDS}, None, torch.float32, "cpu")
    expected = {f"vlm.{k}": v for k, v in vlm.state_dict().items()} | init_head(TINY).state_dict()
    tensors = read_tensors(exported, lambda k: True)  # the project's own sharded reader
    assert set(index) == set(tensors) == set(expected)
    for key, value in tensors.items():
        assert value.shape == expected[key].shape and value.dtype == torch.bfloat16, key
    layers, _ = load_head_file(top_run.checkpoint / VLM_LAYERS)
    head, _ = load_head_file(top_run.checkpoint / "head.safetensors")
    for key, value in {**layers, **head}.items():
        assert torch.equal(tensors[key], value.to(torch.bfloat16)), key
    key = "vlm.model.language_model.layers.0.mlp.up_proj.weight"  # below k: untouched
    assert torch.equal(tensors[key], expected[key].to(torch.bfloat16))
    cfg = from_checkpoint_config(exported)
    assert (cfg.text, cfg.vision, cfg.expert) == (TINY.text, TINY.vision, TINY.expert)
    build_vlm(cfg, {t: 0 for t in PAD_IDS}, exported, torch.float32, "cpu")  # strict: every VLM key
    load_head(str(exported))  # every head key


def test_release_export_keeps_the_index_and_links_untouched_shards(exported, tiny_store, tmp_path):
    run_dir = tmp_path / "from-release"
    train(TrainConfig(store=tiny_store, run_dir=run_dir, init=str(exported), device="cpu", steps=2))
    out = export(ExportConfig(run=run_dir, to=tmp_path / "out"))
    base_index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == base_index
    shards = json.loads((out / "alpamayo_cache_export.json").read_text())["shards"]
    head_shards = {base_index[k] for k in base_index if not k.startswith("vlm.")}
    assert {s for s, how in shards.items() if how == "rewritten"} == head_shards
    for shard, how in shards.items():
        same = (out / shard).stat().st_ino == (exported / shard).stat().st_ino
        assert same == (how == "linked") and how in ("linked", "rewritten")
    before, after = read_tensors(exported, lambda k: True), read_tensors(out, lambda k: True)
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {
        k: (v.shape, v.dtype) for k, v in before.items()
    }
    head, _ = load_head_file(latest_checkpoint(run_dir) / "head.safetensors")
    assert all(torch.equal(after[k], v.to(torch.bfloat16)) for k, v in head.items())
    # Changed VLM layers land in their own shards, under their release names.
    key = "vlm.model.language_model.layers.1.self_attn.k_proj.weight"
    new = torch.randn(after[key].shape)
    (tmp_path / "vlm-out").mkdir()
    from_release(exported, {key: new}, tmp_path / "vlm-out", link=False)
    assert torch.equal(read_tensors(tmp_path / "vlm-out", lambda k: k == key)[key], new.to(torch.bfloat16))
    with pytest.raises(UserError, match="not an empty folder"):
        export(ExportConfig(run=run_dir, to=tmp_path / "out"))


def test_train_dry_run_prints_the_real_size_vlm_top_plan(tmp_path, monkeypatch):
    """`train --dry-run --train vlm-top` on a (metadata-only) real-size k=27 store on a 24 GiB CUDA card."""
    store = tmp_path / "real-k27"
    (store / F.SAMPLES_DIR / "s0").mkdir(parents=True)
    F.write_info(
        store,
        F.StoreInfo(
            F.LAYOUT_VERSION, REAL.name, "preset:alpamayo-r1-10b:seed0", REAL.to_dict(), "traj-only", "bf16",
            "bf16", "sdpa", vlm_from_layer=27,
        ),
    )  # fmt: skip
    sample = F.SampleInfo("s0", "clip", 0, "default", [], "train", length=2993, rope_delta=-2592)
    attrs = {"zarr_format": 3, "node_type": "group", "attributes": {"sample": sample.to_dict()}}
    (store / F.SAMPLES_DIR / "s0" / "zarr.json").write_text(json.dumps(attrs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # plan for a GPU from this CPU machine
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    base = dict(store=store, run_dir=tmp_path / "r", device="cuda", optimizer="adamw8bit", micro_batch=1)
    try:
        assert train(TrainConfig(**base, scope="vlm-top", dry_run=True, val_split="")).step == 0
        with pytest.raises(UserError, match="more than --gpu-memory-gb 24"):
            train(TrainConfig(**base, scope="vlm-top", vlm_train="full", dry_run=True, val_split=""))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    plans = [r.getMessage() for r in records if r.getMessage().startswith("plan (")]
    assert "vlm-top (expert all), VLM layers 27.. lora, adamw8bit" in plans[0]
    assert "verdict: GPU memory fits 24 GiB" in plans[0]
    assert "VLM layers 27.. full" in plans[1] and "does NOT fit 24 GiB" in plans[1]


@pytest.mark.long
def test_vlm_top_resume_reproduces_the_loss_sequence_and_layers(k_store, tmp_path):
    kw = dict(store=k_store, device="cpu", steps=4, save_every=2, scope="vlm-top", val_split="", split="all")
    full = train(TrainConfig(run_dir=tmp_path / "full", **kw))
    first = train(TrainConfig(run_dir=tmp_path / "split", stop_after=2, **kw))
    second = train(TrainConfig(run_dir=tmp_path / "split", resume=True, **kw))
    assert first.losses + second.losses == full.losses
    a, _ = load_head_file(full.checkpoint / VLM_LAYERS)
    b, _ = load_head_file(second.checkpoint / VLM_LAYERS)
    assert all(torch.equal(a[k], b[k]) for k in a)
