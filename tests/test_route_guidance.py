"""Routes and guidance on the tiny 1.5 preset: the shared prefix is bit-identical, the store keeps only
the unguided suffix and rebuilds the unguided prefix exactly, route dropout picks per sample, left padding
changes nothing, and route files are read or refused with one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from alpamayo_cache.config import TINY_15
from alpamayo_cache.data.routes import read_routes
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.guidance import mix_prefixes, training_prefix, unguided_prefix
from alpamayo_cache.model.head import init_head
from alpamayo_cache.model.vlm import FrozenVLM
from alpamayo_cache.store import format as F
from alpamayo_cache.store.dataset import collate
from alpamayo_cache.store.reader import CachedSample


@pytest.fixture(scope="module")
def encoded():
    """One tiny-1.5 sample (4 cameras x 4 frames) encoded with and without its route, fp32 CPU."""
    vlm = FrozenVLM(TINY_15, None, None, "cpu", torch.float32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 4, *TINY_15.image_size, 3), dtype=np.uint8)
    hist = np.cumsum(np.tile([[0.8, 0.0, 0.0]], (16, 1)), axis=0).astype(np.float32) - 12.8
    enc = vlm.encode(images, hist, "traj-only", camera_ids=[0, 1, 2, 6], route="Turn left in 11m")
    return vlm, enc


def test_tokens_before_the_route_have_bit_identical_kv(encoded):
    vlm, enc = encoded
    assert enc.uncond is not None
    start = enc.route_start
    ids = vlm.prompt.build(
        [6] * 16, np.zeros((16, 3), np.float32), "traj-only", [0, 1, 2, 6], "Turn left in 11m"
    )
    assert ids[start] == vlm.prompt.ids["<|route_start|>"]  # the first token that differs
    assert torch.equal(enc.keys[:, :, :start], enc.uncond.keys[:, :, :start])
    assert torch.equal(enc.values[:, :, :start], enc.uncond.values[:, :, :start])
    # the first token after the route already differs: its position moved by the route's length
    assert not torch.equal(enc.keys[:, :, start + 18], enc.uncond.keys[:, :, start])
    route_tokens = enc.length - enc.uncond.length
    assert route_tokens == 2 + len("Turn left in 11m")  # route_start, the bytes, route_end (byte-level BPE)
    assert enc.rope_delta == enc.uncond.rope_delta  # text after the images shifts both counters alike


def _cached(enc, sample_id: str, routed: bool) -> CachedSample:
    start = enc.route_start if routed else -1
    info = F.SampleInfo(
        sample_id=sample_id, clip_id="c", t0_us=0, camera_set="default", cameras=[], split="val",
        length=enc.length, rope_delta=enc.rope_delta, has_route=routed, route_start=start,
        uncond_length=enc.uncond.length if routed else 0, uncond_rope_delta=enc.uncond.rope_delta,
    )  # fmt: skip
    zeros = torch.zeros(16, 3)
    return CachedSample(
        info, enc.keys, enc.values, None, enc.hidden, zeros, torch.eye(3).expand(16, 3, 3),
        torch.zeros(64, 3), torch.eye(3).expand(64, 3, 3), torch.zeros(64, 2),
        uncond_keys=enc.uncond.keys[:, :, start:] if routed else None,
        uncond_values=enc.uncond.values[:, :, start:] if routed else None,
    )  # fmt: skip


def test_unguided_prefix_is_rebuilt_from_the_stored_suffix(encoded):
    _, enc = encoded
    batch = collate([_cached(enc, "routed", True), _cached(enc, "plain", False)])
    uncond = unguided_prefix(batch)
    assert uncond is not None and uncond.lengths.tolist() == [enc.uncond.length, enc.length]
    assert torch.equal(uncond.keys[:, 0, :, : enc.uncond.length], enc.uncond.keys)
    assert torch.equal(uncond.values[:, 0, :, : enc.uncond.length], enc.uncond.values)
    assert torch.equal(uncond.keys[:, 1, :, : enc.length], enc.keys)  # no route: its own prefix
    assert collate([_cached(enc, "plain", False)]).uncond is None


def test_route_dropout_picks_per_sample(encoded):
    _, enc = encoded
    batch = collate([_cached(enc, "a", True), _cached(enc, "b", True)])
    g = torch.Generator().manual_seed(0)
    assert training_prefix(batch, 0.0, g).lengths.tolist() == [enc.length] * 2
    assert training_prefix(batch, 1.0, g).lengths.tolist() == [enc.uncond.length] * 2
    cond, uncond = Prefix.from_batch(batch), unguided_prefix(batch)
    mixed = mix_prefixes(cond, uncond, torch.tensor([True, False]))
    assert mixed.lengths.tolist() == [enc.uncond.length, enc.length]
    assert torch.equal(mixed.keys[:, 0, :, : enc.uncond.length], enc.uncond.keys)
    assert torch.equal(mixed.keys[:, 1, :, : enc.length], enc.keys)


def test_left_padding_gives_the_right_padding_answer(encoded):
    _, enc = encoded
    short = dataclasses.replace(
        enc, keys=enc.keys[:, :, :-7], values=enc.values[:, :, :-7], length=enc.length - 7
    )
    samples = [_cached(enc, "long", False), _cached(short, "short", False)]
    right, left = collate(samples), collate(samples, pad_side="left")
    assert left.key_mask is not None and int((~left.key_mask).sum()) == 7
    head = init_head(TINY_15).eval()
    x = torch.randn(2, 3, 64, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.4, 0.7]])
    with torch.no_grad():
        a = head.velocity(x, t, Prefix.from_batch(right))
        b = head.velocity(x, t, Prefix.from_batch(left))
    assert (a - b).abs().max() < 1e-6


def test_guidance_weight_one_is_the_conditioned_sampler(encoded):
    _, enc = encoded
    batch = collate([_cached(enc, "routed", True)])
    head = init_head(TINY_15).eval()
    noise = torch.randn(1, 2, 64, 2, generator=torch.Generator().manual_seed(2))
    cond, uncond = Prefix.from_batch(batch), unguided_prefix(batch)
    plain = head.sample(cond, noise, 3)
    assert torch.allclose(head.sample(cond, noise, 3, uncond, 1.0), plain, atol=1e-6)
    assert (head.sample(cond, noise, 3, uncond, 1.5) - plain).abs().max() > 1e-4
    assert torch.allclose(head.sample(cond, noise, 3, uncond, 0.0), head.sample(uncond, noise, 3), atol=1e-6)


def test_route_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": "Turn left in 11m", "b": " ", "c": "Go"}))
    assert read_routes(tmp_path / "r.json") == {"a": "Turn left in 11m", "c": "Go"}
    (tmp_path / "r.csv").write_text('clip_id,route\na,"Turn right, then left"\nb,\n')
    assert read_routes(tmp_path / "r.csv") == {"a": "Turn right, then left"}
    bad = {
        "list.json": "[1, 2]",
        "broken.json": "{",
        "special.json": json.dumps({"a": "<|route_end|>"}),
        "header.csv": "clip,text\na,b\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as err:
            read_routes(tmp_path / name)
        assert "\n" not in str(err.value), name
    with pytest.raises(UserError, match="does not exist"):
        read_routes(tmp_path / "missing.json")
