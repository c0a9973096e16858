"""Image preprocessing exactly as the released Alpamayo-R1 *inference* path does it, with torch alone.

The release hands its uint8 camera frames (CHW torch tensors on the CPU) to the processor of
``Qwen/Qwen3-VL-2B-Instruct`` with min_pixels 163,840 and max_pixels 196,608. Its image part is
transformers' ``Qwen2VLImageProcessorFast``, which
1. picks the output size with ``smart_resize`` (multiples of patch * merge = 32, pixel count in range):
   1080x1920 -> 320x576;
2. resizes with torchvision ``resize(BICUBIC, antialias=True)`` on the *uint8* tensor. On the CPU,
   torchvision keeps bicubic uint8 native, i.e. calls
   ``torch.nn.functional.interpolate(x_uint8, mode="bicubic", align_corners=False, antialias=True)``,
   whose uint8 kernel works in fixed point and rounds/clamps inside (the result does not depend on the
   memory format, nor on whether the AVX2 or the generic kernel runs);
3. rescales and normalises in one step, ``(x - 127.5) / 127.5`` in float32 (mean = std = 0.5 * 255);
4. repeats each single frame twice in time and cuts 16x16 patches, grouped by 2x2 merge blocks.

Not matched (on purpose): the release's fine-tuning path feeds float frames (x / 255) and resizes in
float without uint8 rounding, and torchvision off the CPU (e.g. CUDA) converts to float32, resizes, clamps
and rounds, which changes ~9% of the uint8 values (up to ~20 levels at saturated edges). So the resize
here always runs on the CPU, whatever device the model is on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from alpamayo_cache.errors import UserError

# The release's pixel budget per image (helper.get_processor) and Qwen3-VL's patch geometry.
MIN_PIXELS = 163_840
MAX_PIXELS = 196_608
PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
# mean = std = 0.5 on the 0..1 scale, fused with the 1/255 rescale: 0.5 * 255 = 127.5 on the uint8 scale.
NORM_CENTER = 127.5


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_SIZE * MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Output (h, w) of the Qwen-VL processor for an input of ``height`` x ``width`` pixels.

    Both sides become multiples of ``factor`` near the input's aspect ratio; if that leaves the pixel
    count outside [min_pixels, max_pixels], both sides are scaled by one factor and floored (too many)
    or ceiled (too few) to multiples of ``factor``. Python's ``round`` (half to even) as in transformers.
    """
    if min(height, width) <= 0:
        raise UserError(f"image size {height}x{width} is empty: frames must have positive height and width")
    if max(height, width) / min(height, width) > 200:
        raise UserError(
            f"image {height}x{width} has an aspect ratio above 200: the Qwen-VL processor refuses it"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [n, H, W, 3] (HWC, RGB) -> uint8 [n, h, w, 3] with the processor's CPU resize kernel.

    Identity (the same array) when the frames already have the size, as torchvision returns its input.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
    h, w = (int(v) for v in size)
    if frames.shape[1:3] == (h, w):
        return frames
    # NCHW view of the HWC buffer (channels-last strides, no copy). The tensor stays uint8 and on the CPU:
    # that selects torch's native uint8 bicubic-antialias kernel, the one torchvision uses on the CPU.
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    assert y.dtype == torch.uint8  # a float route would round differently (module docstring)
    return np.ascontiguousarray(y.permute(0, 2, 3, 1).numpy())


def pixel_values(
    resized: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Processor rows of resized frames: (pixel_values float32 [N, 3 * T * P * P], image_grid_thw int64 [n, 3]).

    ``resized``: uint8 [n, h, w, 3] (HWC). Each frame is one image: it is repeated T times in time, so
    grid t = 1. Rows are ordered (image, t, block row, block column, row in the merge block, column in it);
    each row is (channel, time, patch row, patch column) flattened.
    """
    resized = np.asarray(resized)
    if resized.dtype != np.uint8 or resized.ndim != 4 or resized.shape[-1] != 3:
        raise ValueError(f"resized frames must be uint8 [n, h, w, 3], got {resized.dtype} {resized.shape}")
    n, h, w, c = resized.shape
    block = patch_size * merge_size
    if h % block or w % block:
        raise UserError(
            f"image size {h}x{w} is not a multiple of {block} (patch {patch_size} x merge {merge_size}): "
            "resize to a smart_resize size first"
        )
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32)  # [n, c, h, w], exact
    x = (x - NORM_CENTER) / NORM_CENTER  # float32 subtract then true divide, as torchvision's normalize
    x = x.unsqueeze(1).expand(n, temporal_patch_size, c, h, w)  # single frame repeated in time
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(
        n,
        1,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    # -> (n, t, block row, block col, merge row, merge col, channel, time, patch row, patch col)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    rows = x.reshape(n * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.int64).reshape(n, 3)
    return rows, grid


def tokens_per_image(grid_thw: torch.Tensor | np.ndarray, merge_size: int = MERGE_SIZE) -> list[int]:
    """``<|image_pad|>`` tokens per image: t * h * w patches merged merge_size^2 at a time (180 for 320x576)."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in grid]
