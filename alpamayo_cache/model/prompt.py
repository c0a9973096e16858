"""The Alpamayo-R1 prompt: token ids (Qwen chat format, built token by token) and the pixels of its
images (the release inference path's preprocessing, in ``pixels``). REFERENCE §3:

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
    16 x (<|vision_start|> N x <|image_pad|> <|vision_end|>)
    <|traj_history_start|> 48 history tokens <|traj_history_end|>{USER_TEXT}<|im_end|>\\n
    <|im_start|>assistant\\n<|traj_future_start|>                      (traj-only)
    <|im_start|>assistant\\n<|cot_start|> ... sampled ... <|traj_future_start|>   (reasoning)

The cache handed to the expert ends just after ``<|traj_future_start|>`` (inclusive).
"""

from __future__ import annotations

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.model import pixels
from alpamayo_cache.model.history_tokens import history_token_bins
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
]


class PromptBuilder:
    def __init__(self, tokenizer, cfg: ModelConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS + PROMPT_SPECIALS}

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def build(self, tokens_per_image: list[int], hist_xyz: np.ndarray, mode: str) -> list[int]:
        s = self.ids
        ids = [s["<|im_start|>"], *self._text("system\n" + SYSTEM), s["<|im_end|>"], *self._text("\n")]
        ids += [s["<|im_start|>"], *self._text("user\n")]
        for n in tokens_per_image:
            ids += [s["<|vision_start|>"], *([s["<|image_pad|>"]] * n), s["<|vision_end|>"]]
        bins = history_token_bins(hist_xyz, self.cfg.hist_num_bins)
        hist_ids = (self.cfg.traj_token_start_idx + self.cfg.hist_token_offset + bins).tolist()
        ids += [s["<|traj_history_start|>"], *hist_ids, s["<|traj_history_end|>"]]
        ids += [*self._text(USER_TEXT[mode]), s["<|im_end|>"], *self._text("\n")]
        ids += [s["<|im_start|>"], *self._text("assistant\n")]
        ids.append(s["<|traj_future_start|>"] if mode == "traj-only" else s["<|cot_start|>"])
        return ids


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
