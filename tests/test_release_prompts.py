"""The 1.5 and 2 Super prompts against the releases' own builders (tests/fixtures/releases/).

Every comparison is exact: the rendered text character for character, and the token ids with the
fixtures' byte-level tokenizer (the same ids ``build_tiny_tokenizer`` gives). A case the project does not
build (the 1.5 VQA prompt) is skipped by name, so a new case in the fixture fails until it is handled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from alpamayo_cache.config import TINY_2S, TINY_15
from alpamayo_cache.model.history_tokens import history_subset, history_token_bins
from alpamayo_cache.model.prompt import PromptBuilder
from alpamayo_cache.model.tokenizer import build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "releases"
NOT_BUILT = {"cam4_labels_vqa"}  # a question-answer prompt, not a driving prompt


def load(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


@pytest.fixture(scope="module")
def a15():
    return load("a15_prompts")


@pytest.fixture(scope="module")
def tok15():
    return build_tiny_tokenizer(TINY_15)


@pytest.fixture(scope="module")
def tok2():
    return build_tiny_tokenizer(TINY_2S)  # 4,000 trajectory tokens: history first, then future


@pytest.fixture(scope="module")
def a2():
    return load("a2_expert")


def pads_per_image(grid: torch.Tensor) -> list[int]:
    return [int(t * h * w) // 4 for t, h, w in grid.tolist()]


def test_tiny_tokenizer_has_the_release_ids(a15, a2, tok15, tok2):
    for name, idx in a15[1]["tokenizer"]["special_token_ids"].items():
        if "_padding_" not in name:  # 1.5 renamed unused slots; the ids are R1's
            assert tok15.convert_tokens_to_ids(name) == idx, name
    for name, idx in a2[1]["tokenizer"]["special_token_ids"].items():
        assert tok2.convert_tokens_to_ids(name) == idx, name


def test_15_prompts_match_the_release_builder(a15, tok15):
    tensors, meta = a15
    builder = PromptBuilder(tok15, TINY_15)
    bare = PromptBuilder(builder.tok, dataclasses.replace(TINY_15, camera_labels=False, frame_labels=False))
    checked = 0
    for case in meta["cases"]:
        if case["name"] in NOT_BUILT:
            continue
        per_image = pads_per_image(tensors[f"{case['name']}.image_grid_thw"])
        cams = case["camera_indices"]
        b = builder if cams is not None else bare
        prompt = b.prompt(per_image, None, "reasoning", camera_ids=cams, route=case["nav_text"])
        assert prompt.text == case["rendered_text"], case["name"]
        expected = tensors[f"{case['name']}.input_ids"][0].tolist()
        assert prompt.ids == expected, case["name"]
        checked += 1
    assert checked == len(meta["cases"]) - len(NOT_BUILT) == 11


def test_15_real_size_image_tokens(a15):
    """1080x1920 frames at the release's pixel limits: 180 tokens per image (grid 1 x 20 x 36)."""
    from alpamayo_cache.config import ALPAMAYO_15
    from alpamayo_cache.model.prompt import tokens_per_image

    grid = a15[0]["cam4_labels_route_1080p.image_grid_thw"]
    assert pads_per_image(grid) == [tokens_per_image(ALPAMAYO_15)] * 16 == [180] * 16


def test_2super_prompts_with_45_and_48_history_tokens(a2, tok2):
    tensors, meta = a2
    tok = tok2
    hist = tensors["prompt.ego_history_xyz"][0, 0].numpy()
    for count in (48, 45):
        name = f"traj6_hist{count}"
        cfg = dataclasses.replace(TINY_2S, history_tokens=count)
        builder = PromptBuilder(tok, cfg)
        per_image = pads_per_image(tensors[f"prompt.{name}.image_grid_thw"])
        cams = meta["prompts"][name]["camera_indices"]
        prompt = builder.prompt(per_image, None, "reasoning", camera_ids=cams)
        assert prompt.text == meta["prompts"][name]["rendered_text"], name
        assert prompt.ids == tensors[f"prompt.{name}.input_ids"][0].tolist(), name
        fused = builder.build(per_image, hist, "reasoning", camera_ids=cams)
        assert fused == tensors[f"prompt.{name}.fused_input_ids"][0].tolist(), name


def test_45_history_tokens_are_the_last_45_of_48(a2):
    tensors, _ = a2
    bins = history_token_bins(tensors["prompt.ego_history_xyz"][0, 0].numpy())
    assert np.array_equal(history_subset(bins, 45), bins[3:])
    fused48 = tensors["prompt.traj6_hist48.fused_input_ids"][0]
    fused45 = tensors["prompt.traj6_hist45.fused_input_ids"][0]
    hist48 = fused48[(fused48 >= 263) & (fused48 < 1263)]
    hist45 = fused45[(fused45 >= 263) & (fused45 < 1263)]
    assert hist48.tolist()[3:] == hist45.tolist() and len(hist45) == 45


def test_2super_nav_demo_prompts(a2, tok2):
    """The demo's raw route (no delimiter) and its unguided twin (the route removed)."""
    tensors, meta = a2
    demo = meta["prompts"]["nav_cfg_demo"]
    cfg = dataclasses.replace(TINY_2S, history_tokens=demo["tokens_per_history_traj"])
    builder = PromptBuilder(tok2, cfg)
    per_image = [6] * 24
    cams = meta["prompts"]["traj6_hist48"]["camera_indices"]
    guided = builder.prompt(per_image, None, "reasoning", camera_ids=cams, route=demo["nav_text"])
    expanded = guided.text.replace("<|image_pad|>", "<|image_pad|>" * 6)  # the demo renders every pad
    assert expanded == demo["rendered_text_guided"]
    assert guided.ids == tensors["prompt.nav_guided.input_ids"][0].tolist()
    unguided = builder.build(per_image, None, "reasoning", camera_ids=cams)
    assert unguided == tensors["prompt.nav_unguided.input_ids"][0].tolist()


def test_r1_prompt_is_unchanged_by_the_new_builder():
    """R1 (no labels, no route, prefill): the ids equal the per-piece R1 construction."""
    from alpamayo_cache.config import TINY

    tok = build_tiny_tokenizer(TINY)
    ids = PromptBuilder(tok, TINY).build([6, 6], np.zeros((16, 3), np.float32), "traj-only")

    def text(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    c = tok.convert_tokens_to_ids
    expected = [c("<|im_start|>"), *text("system\nYou are a driving assistant that generates safe and accurate actions."), c("<|im_end|>"), *text("\n")]  # fmt: skip
    expected += [c("<|im_start|>"), *text("user\n")]
    expected += [c("<|vision_start|>"), *[c("<|image_pad|>")] * 6, c("<|vision_end|>")] * 2
    expected += [
        c("<|traj_history_start|>"),
        *[263 + 500, 263 + 500, 263 + 500] * 16,
        c("<|traj_history_end|>"),
    ]
    expected += [*text("output the future trajectory."), c("<|im_end|>"), *text("\n"), c("<|im_start|>")]
    expected += [*text("assistant\n"), c("<|traj_future_start|>")]
    assert ids == expected
