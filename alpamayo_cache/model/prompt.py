"""The prompt of each release: token ids (Qwen chat format) and the pixels of its images (the release
inference path's preprocessing, in ``pixels``). REFERENCE §3 for R1; releases_facts §1, §4 for 1.5 / 2 Super:

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
    for each camera (ordered by id): ["{display name}: "] and for each frame ["frame {k} "]
        <|vision_start|> N x <|image_pad|> <|vision_end|>             (labels: 1.5, 2 Super)
    <|traj_history_start|> 48 (or 45) history tokens <|traj_history_end|>
    [<|route_start|>{route}<|route_end|> (1.5) | {route} (2 Super demo)]{USER_TEXT}<|im_end|>\\n
    <|im_start|>assistant\\n<|traj_future_start|>                                    (traj-only)
    <|im_start|>assistant\\n[<|cot_start|>] ... sampled ... <|traj_future_start|>    (reasoning)

The releases render this text and tokenise it whole: adjacent text (a camera name and "frame 0 ", a raw
route and the instruction) is one run for the BPE, so text is merged up to the next special token before
tokenising. The cache handed to the expert ends just after ``<|traj_future_start|>`` (inclusive).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model import pixels
from alpamayo_cache.model.history_tokens import history_subset, history_token_bins
from alpamayo_cache.model.tokenizer import QWEN_SPECIALS

SYSTEM = "You are a driving assistant that generates safe and accurate actions."
USER_TEXT = {
    "traj-only": "output the future trajectory.",
    "reasoning": "output the chain-of-thought reasoning of the driving process, then output the future trajectory.",
}
PROMPT_SPECIALS = [
    "<|traj_history_start|>",
    "<|traj_history_end|>",
    "<|traj_history|>",
    "<|traj_future_start|>",
    "<|cot_start|>",
    "<|route_start|>",
    "<|route_end|>",
]
# Release camera id -> the label 1.5 and 2 Super print before that camera's first frame.
CAMERA_DISPLAY_NAMES = {
    0: "Front left camera",
    1: "Front camera",
    2: "Front right camera",
    3: "Rear left camera",
    4: "Rear camera",
    5: "Rear right camera",
    6: "Front telephoto camera",
}


def display_name(camera_id: int) -> str:
    return CAMERA_DISPLAY_NAMES.get(camera_id, f"Camera {camera_id}")


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the rendered prompt: one <|image_pad|> per image, specials written out


class PromptBuilder:
    def __init__(self, tokenizer, cfg: ModelConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS + PROMPT_SPECIALS}

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _special(self, name: str, count: int = 1) -> tuple[str, list[int]]:
        return name, [self.ids[name]] * count

    def history_ids(self, hist_xyz: np.ndarray) -> list[int]:
        """The history tokens' ids: delta-tokenizer bins (the last ``history_tokens`` of them) + offset."""
        bins = history_subset(history_token_bins(hist_xyz, self.cfg.hist_num_bins), self.cfg.history_tokens)
        return (self.cfg.traj_token_start_idx + self.cfg.hist_token_offset + bins).tolist()

    def _items(
        self,
        tokens_per_image: list[int],
        hist_xyz: np.ndarray | None,
        mode: str,
        camera_ids: list[int] | None,
        route: str | None,
    ) -> list[tuple[str, list[int] | None]]:
        """(rendered text, ids) per piece; ids None = text to tokenise with its neighbours."""
        cfg, sp = self.cfg, self._special
        items: list[tuple[str, list[int] | None]] = [
            sp("<|im_start|>"), ("system\n" + SYSTEM, None), sp("<|im_end|>"), ("\n", None),
            sp("<|im_start|>"), ("user\n", None),
        ]  # fmt: skip
        labels = cfg.camera_labels or cfg.frame_labels
        if labels and not camera_ids:
            raise UserError(f"model {cfg.name} labels its cameras: the prompt needs the camera ids")
        per_camera = len(tokens_per_image) // len(camera_ids) if labels else len(tokens_per_image)
        for i, n in enumerate(tokens_per_image):
            frame = i % per_camera
            if cfg.camera_labels and frame == 0:
                items.append((f"{display_name(camera_ids[i // per_camera])}: ", None))
            if cfg.frame_labels:
                items.append((f"frame {frame} ", None))
            items += [sp("<|vision_start|>"), ("<|image_pad|>", [self.ids["<|image_pad|>"]] * n)]
            items.append(sp("<|vision_end|>"))
        items.append(sp("<|traj_history_start|>"))
        if hist_xyz is None:  # placeholders, as the releases' processors see the prompt
            items.append(
                ("<|traj_history|>" * cfg.history_tokens, [self.ids["<|traj_history|>"]] * cfg.history_tokens)
            )
        else:
            hist = self.history_ids(hist_xyz)
            items.append(("".join(f"<i{i - cfg.traj_token_start_idx}>" for i in hist), hist))
        items.append(sp("<|traj_history_end|>"))
        if route:
            if cfg.route == "none":
                raise UserError(f"model {cfg.name} takes no route: drop --route or use a 1.5 / 2 Super model")
            if cfg.route == "tokens":
                items += [sp("<|route_start|>"), (route, None), sp("<|route_end|>")]
            else:
                items.append((route, None))  # raw: one text run with the instruction that follows
        items += [
            (USER_TEXT[mode], None),
            sp("<|im_end|>"),
            ("\n", None),
            sp("<|im_start|>"),
            ("assistant\n", None),
        ]
        if mode == "traj-only":
            items.append(sp("<|traj_future_start|>"))
        elif cfg.cot_prefill:
            items.append(sp("<|cot_start|>"))
        return items

    def prompt(
        self,
        tokens_per_image: list[int],
        hist_xyz: np.ndarray | None,
        mode: str,
        camera_ids: list[int] | None = None,
        route: str | None = None,
    ) -> Prompt:
        items = self._items(tokens_per_image, hist_xyz, mode, camera_ids, route)
        ids: list[int] = []
        run: list[str] = []
        for text, piece in items + [("", [])]:
            if piece is None:
                run.append(text)
                continue
            if run:
                ids += self._text("".join(run))
                run = []
            ids += piece
        return Prompt(ids, "".join(t for t, _ in items))

    def build(
        self,
        tokens_per_image: list[int],
        hist_xyz: np.ndarray | None,
        mode: str,
        camera_ids: list[int] | None = None,
        route: str | None = None,
    ) -> list[int]:
        return self.prompt(tokens_per_image, hist_xyz, mode, camera_ids, route).ids


def image_inputs(images: np.ndarray, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """uint8 [c, f, h, w, 3] frames at the model's size (camera-major) -> (pixel_values [N, C*T*P*P]
    float32, image_grid_thw [c*f, 3], image tokens per image)."""
    frames = images.reshape(-1, *images.shape[-3:])
    v = cfg.vision
    values, grid = pixels.pixel_values(frames, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    return values, grid, pixels.tokens_per_image(grid, v.spatial_merge_size)


def tokens_per_image(cfg: ModelConfig) -> int:
    h, w = cfg.image_size
    merged = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    return (h // merged) * (w // merged)
