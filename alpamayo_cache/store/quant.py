"""int8 and int4 K/V, KIVI-style: keys quantised per channel, values per token, asymmetric (scale + zero).

Why this split (KIVI, Liu et al. 2024): the VLM's post-RoPE keys carry a few outlier *channels* (same
channel, large in every token), so one scale per channel keeps the outliers from flattening the other
channels; values have no such channel structure and quantise best per token. Codes are unsigned,
``x ~= code * scale + zero`` with ``zero`` the group's minimum, so a skewed group uses the full code range.

- int8: one K group per channel over all of the sample's tokens, one V group per token over all channels.
- int4: K groups of ``INT4_GROUP`` tokens per channel, V groups of ``INT4_GROUP`` channels per token, codes
  packed two per byte along the head dim (low nibble = even channel).

Scales and zeros are float16 (4 bytes per group; float32 gave the same int8 error, 0.80%, in a quick check,
and would double the int4 overhead). ``INT4_GROUP`` = 32, chosen by measurement on synthetic real-size K/V
(L = 2,993, K ~ N(0, 1.5) with 4 outlier channels per head at 15x, V ~ N(0, 0.7), rounded to bf16;
``benchmarks/kv_quant_error.py``): relative Frobenius error of K and V together, bits per value with scales,

    fp8 (one scale per layer and K|V)   2.64%  8.0      int4, groups of 128   9.96%  4.25
    int8 (per-channel K, per-token V)   0.80%  8.13     int4, groups of  64   8.97%  4.5
    int4 without groups                13.57%  4.13     int4, groups of  32   7.82%  5.0
                                                        int4, groups of  16   6.51%  6.0

Gaussian noise has no structure for grouping to exploit, so these int4 numbers are its worst case; each
halving of the group buys ~1.1-1.3 points for 0.25-1 more bit. 32 is KIVI's group and keeps int4 at 0.31x
bf16 (int8 is 0.51x at a tenth of int4's error). Where the head dim is smaller than 32 (the tiny preset's
16) the group is the head dim. What the errors cost downstream is measured by
``benchmarks/quantisation_cost.py`` (benchmarks/RESULTS.md).

Everything here is torch on the tensor's own device: precompute encodes on the compute device before the
host copy, and the model dequantises one layer at a time on its device (``KVQuant.dequantize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

INT_BITS = {"int8": 8, "int4": 4}
INT4_GROUP = 32
SCALE_DTYPE = torch.float16
_TINY_SCALE = 2.0**-14  # float16's smallest normal: a constant group gets codes 0 and decodes exactly
_FP16_MAX = 65504.0


def default_group(kv_dtype: str, head_dim: int = INT4_GROUP) -> int:
    """Group size of a quantised K/V dtype (0: the whole axis; also for the unquantised dtypes). int4 uses
    ``INT4_GROUP``, or the whole head dim where that is smaller (the tiny preset's 16)."""
    return min(INT4_GROUP, head_dim) if kv_dtype == "int4" else 0


def code_width(head_dim: int, kv_dtype: str) -> int:
    """Bytes of codes per head-dim row on disk (int4 packs two codes per byte)."""
    return head_dim // 2 if kv_dtype == "int4" else head_dim


def key_groups(length: int, group: int) -> int:
    """K scale rows of a sample of ``length`` tokens (one per token group; 1 when the group is all tokens)."""
    return 1 if group == 0 else math.ceil(length / group)


def value_groups(head_dim: int, group: int) -> int:
    """V scale columns per token (one per channel group; 1 when the group is all channels)."""
    return 1 if group == 0 else head_dim // group


def check_dims(kv_dtype: str, head_dim: int, group: int) -> None:
    if kv_dtype == "int4" and (head_dim % 2 or (group and head_dim % group)):
        raise ValueError(f"int4 K/V needs an even head dim divisible by the group {group}, got {head_dim}")


def _scale_zero(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, zero) of groups spanning [low, high], as stored (codes are computed against these)."""
    if max(float(high.max()), -float(low.min())) >= _FP16_MAX:
        raise ValueError("K/V values beyond float16's range cannot be stored as int8/int4: use bf16 or fp8")
    scale = ((high - low) / levels).to(SCALE_DTYPE).clamp_min(_TINY_SCALE)
    return scale, low.to(SCALE_DTYPE)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., d] -> [..., d/2] bytes (low nibble: even channel, high: odd)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """[..., d/2] bytes -> uint8 codes [..., d]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_layer(
    keys: torch.Tensor, values: torch.Tensor, kv_dtype: str, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's K, V [h, L, d] -> (codes [2, h, L, w] uint8, k_quant [2, h, nk, d], v_quant [2, h, L, nv])
    with (scale, zero) stacked on the first axis of the quant arrays; on the inputs' device."""
    levels = (1 << INT_BITS[kv_dtype]) - 1
    heads, length, dim = keys.shape
    k = keys.float()
    g = length if group == 0 else group
    n = key_groups(length, group)
    pad = n * g - length  # the last token group is padded with its own last token: min/max unchanged
    padded = torch.cat([k, k[:, -1:].expand(heads, pad, dim)], dim=1) if pad else k
    grouped = padded.reshape(heads, n, g, dim)
    k_scale, k_zero = _scale_zero(grouped.amin(dim=2), grouped.amax(dim=2), levels)
    k_codes = _codes(grouped, k_scale[:, :, None], k_zero[:, :, None], levels).reshape(heads, n * g, dim)
    v = values.float()
    gv = dim if group == 0 else group
    vg = v.reshape(heads, length, dim // gv, gv)
    v_scale, v_zero = _scale_zero(vg.amin(dim=3), vg.amax(dim=3), levels)
    v_codes = _codes(vg, v_scale[..., None], v_zero[..., None], levels).reshape(heads, length, dim)
    codes = torch.stack([k_codes[:, :length], v_codes])
    if kv_dtype == "int4":
        codes = pack4(codes)
    return codes, torch.stack([k_scale, k_zero]), torch.stack([v_scale, v_zero])


def quantize(kv: torch.Tensor, kv_dtype: str, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[l, 2, h, L, d] -> (codes [l, 2, h, L, w], k_quant [l, 2, h, nk, d], v_quant [l, 2, h, L, nv]) on
    kv's device, one layer at a time (float32 temporaries of one layer, not of the whole sample)."""
    layers, _, heads, length, dim = kv.shape
    check_dims(kv_dtype, dim, group)
    device = kv.device
    codes = torch.empty(layers, 2, heads, length, code_width(dim, kv_dtype), dtype=torch.uint8, device=device)
    k_quant = torch.empty(layers, 2, heads, key_groups(length, group), dim, dtype=SCALE_DTYPE, device=device)
    v_quant = torch.empty(
        layers, 2, heads, length, value_groups(dim, group), dtype=SCALE_DTYPE, device=device
    )
    for i in range(layers):
        codes[i], k_quant[i], v_quant[i] = quantize_layer(kv[i, 0], kv[i, 1], kv_dtype, group)
    return codes, k_quant, v_quant


def _expand(x: torch.Tensor, dim: int, group: int, size: int) -> torch.Tensor:
    """Per-group parameters -> per element along ``dim`` (broadcast when there is one group)."""
    if x.shape[dim] == 1:
        return x.float()
    return x.float().repeat_interleave(group, dim=dim).narrow(dim, 0, size)


@dataclass
class KVQuant:
    """Dequantisation parameters of a batch of int8/int4 K/V (float16), batch layout like the codes.

    k_scale, k_zero: [l, b, h, nk, d]  per key channel and token group (nk = 1 for int8)
    v_scale, v_zero: [l, b, h, t, nv]  per value token and channel group (nv = 1 for int8)
    Rows past a sample's length are zero (its codes there are masked by the expert anyway).
    """

    kv_dtype: str
    group: int
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k_scale, self.k_zero, self.v_scale, self.v_zero

    def to(self, device: torch.device | str) -> KVQuant:
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        return replace(self, k_scale=moved[0], k_zero=moved[1], v_scale=moved[2], v_zero=moved[3])

    def pin_memory(self) -> KVQuant:
        pinned = [t.pin_memory() for t in self.tensors()]
        return replace(self, k_scale=pinned[0], k_zero=pinned[1], v_scale=pinned[2], v_zero=pinned[3])

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors())

    def dequantize(
        self, index: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s codes K, V [b, h, t, w] -> ``dtype`` [b, h, t, d] on the codes' device
        (float32 arithmetic, then one cast)."""
        if self.kv_dtype == "int4":
            keys, values = unpack4(keys), unpack4(values)
        t, d = keys.shape[2], keys.shape[3]
        gk, gv = self.group, d // self.v_scale.shape[-1]  # tokens per K group, channels per V group
        k = keys.float() * _expand(self.k_scale[index], 2, gk, t) + _expand(self.k_zero[index], 2, gk, t)
        v = values.float() * _expand(self.v_scale[index], 3, gv, d) + _expand(self.v_zero[index], 3, gv, d)
        return k.to(dtype), v.to(dtype)
