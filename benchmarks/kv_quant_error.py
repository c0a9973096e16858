"""Relative error and size of every K/V encoding on synthetic real-size K/V with outlier channels.

K/V of one real-size sample (36 layers x K|V x 8 kv-heads x 2,993 tokens x 128), drawn like
``benchmarks/real_size_io.py``: K ~ N(0, 1.5) with 4 outlier channels per head at 15x (post-RoPE keys of
Qwen-style models have a few such channels), V ~ N(0, 0.7), rounded to bf16 (the VLM's output precision).
Each encoding goes through the project's own encoder (``format.encode_kv_arrays``) and decoder (the
model's per-layer dequantisation), one layer at a time. Printed per encoding: relative Frobenius error
||x' - x|| / ||x|| of K, V and both, bits per value including scales, bytes per sample, encode ms per layer.

    python benchmarks/kv_quant_error.py                 # all 36 layers
    python benchmarks/kv_quant_error.py --layers 4      # quicker, same numbers to ~0.01 points
"""

from __future__ import annotations

import argparse
import time

import torch

from alpamayo_cache.store import format as F
from alpamayo_cache.store import quant as Q

KV_HEADS, LENGTH, HEAD_DIM = 8, 2993, 128


def layer_kv(layer: int) -> torch.Tensor:
    """[1, 2, h, L, d] float32 (bf16-rounded) K/V of one layer, seeded by the layer."""
    g = torch.Generator().manual_seed(layer)
    kv = torch.randn(1, 2, KV_HEADS, LENGTH, HEAD_DIM, generator=g)
    kv[:, 0] *= 1.5
    kv[:, 0, :, :, :4] *= 15.0
    kv[:, 1] *= 0.7
    return kv.bfloat16().float()


def decode(arrays: dict, kv_dtype: str, group: int) -> torch.Tensor:
    """Encoded arrays of one layer -> float32 [2, h, L, d], as the model dequantises them."""
    codes = torch.from_numpy(arrays[F.KV])[0]  # [2, h, L, w]
    if kv_dtype in Q.INT_BITS:
        kq, vq = torch.from_numpy(arrays[F.K_QUANT]), torch.from_numpy(arrays[F.V_QUANT])
        quant = Q.KVQuant(kv_dtype, group, kq[:, 0, None], kq[:, 1, None], vq[:, 0, None], vq[:, 1, None])
        k, v = quant.dequantize(0, codes[0][None], codes[1][None], torch.float32)
        return torch.stack([k[0], v[0]])
    if kv_dtype == "bf16":
        return codes.view(torch.bfloat16).float()
    scale = torch.from_numpy(arrays[F.KV_SCALE])[0]  # fp8: [2]
    return codes.view(torch.float8_e4m3fn).float() * scale[:, None, None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--groups", default="0,128,64,32,16", help="int4 group sizes (0: no groups)")
    args = parser.parse_args()
    options = [("bf16", 0), ("fp8", 0), ("int8", 0)]
    options += [("int4", int(g)) for g in args.groups.split(",")]
    print(f"synthetic real-size K/V, {args.layers} of 36 layers, L={LENGTH}; relative Frobenius error")
    print(
        "| encoding | K error | V error | K+V error | bits/value | MB per sample (36 layers) | encode ms/layer |"
    )
    print("|---|---|---|---|---|---|---|")
    for kv_dtype, group in options:
        err = torch.zeros(2, dtype=torch.float64)
        ref = torch.zeros(2, dtype=torch.float64)
        nbytes, seconds = 0, 0.0
        for layer in range(args.layers):
            kv = layer_kv(layer)
            start = time.perf_counter()
            arrays = F.encode_kv_arrays(kv, kv_dtype, group)
            seconds += time.perf_counter() - start
            nbytes += sum(a.nbytes for a in arrays.values())
            out = decode(arrays, kv_dtype, group)
            err += ((out - kv[0]) ** 2).sum(dim=(1, 2, 3)).double()
            ref += (kv[0] ** 2).sum(dim=(1, 2, 3)).double()
        k, v, both = (err / ref).sqrt().tolist() + [float((err.sum() / ref.sum()).sqrt())]
        name = (
            kv_dtype if kv_dtype != "int4" else f"int4, {'no groups' if group == 0 else f'groups of {group}'}"
        )
        values = args.layers * 2 * KV_HEADS * LENGTH * HEAD_DIM
        print(
            f"| {name} | {100 * k:.2f}% | {100 * v:.2f}% | {100 * both:.2f}% | {8 * nbytes / values:.3f} "
            f"| {nbytes * 36 / args.layers / 1e6:.0f} | {1e3 * seconds / args.layers:.0f} |"
        )


if __name__ == "__main__":
    main()
