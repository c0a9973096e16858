"""Re-encode a store's K/V into another ``--kv-dtype`` without running the VLM again.

From an fp32 store (what precompute writes on CPU, and the exact VLM output) the result is byte for byte
what ``precompute --kv-dtype X`` would have written, because both encode the same float K/V with
``format.encode_kv_arrays``; from a bf16/fp8/int store it re-encodes the already rounded values. Every other
array and each sample's attributes are copied unchanged, so the samples, splits and ids stay the same.
Used by ``benchmarks/quantisation_cost.py`` (the same samples under every dtype) and the tests.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import format as F
from alpamayo_cache.store.quant import KVQuant, default_group
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.store.writer import StoreWriter


def float_kv(reader: StoreReader, sample_id: str) -> torch.Tensor:
    """One sample's K/V [l, 2, h, L, d] in float32, dequantised from whatever the store holds."""
    s = reader.read(sample_id)
    keys, values = s.keys[:, None], s.values[:, None]  # [l, b=1, h, L, w]: the batch layout
    out = []
    for layer in range(keys.shape[0]):
        if s.k_quant is not None:
            q = KVQuant(s.kv_dtype, s.kv_group, s.k_quant[:, 0, None], s.k_quant[:, 1, None],
                        s.v_quant[:, 0, None], s.v_quant[:, 1, None])  # fmt: skip
            k, v = q.dequantize(layer, keys[layer], values[layer], torch.float32)
        else:
            scale = None if s.kv_scale is None else s.kv_scale[layer]
            k = F.dequantize(keys[layer], None if scale is None else scale[None, 0], torch.float32)
            v = F.dequantize(values[layer], None if scale is None else scale[None, 1], torch.float32)
        out.append(torch.stack([k[0], v[0]]))
    return torch.stack(out)


def transcode(src: Path, dst: Path, kv_dtype: str, sample_ids: list[str] | None = None) -> int:
    """Write every committed sample of ``src`` (or those named) into a new store ``dst`` with K/V in
    ``kv_dtype``; returns how many ``dst`` holds."""
    reader = StoreReader(src)
    if (Path(dst) / "zarr.json").exists():
        raise UserError(f"{dst} is already a store: transcode writes a new one")
    if reader.info.vlm_from_layer is not None or reader.info.inputs:
        raise UserError(
            f"{src} holds routes or --vlm-from-layer states, which transcode does not carry: run precompute "
            f"with --kv-dtype {kv_dtype} instead"
        )
    head_dim = int(reader.info.model_config.get("text", {}).get("head_dim", 0))
    group = default_group(kv_dtype, head_dim) if head_dim else default_group(kv_dtype)
    info = replace(
        reader.info,
        kv_dtype=kv_dtype,
        kv_group=group,
        fingerprint=F.StoreInfo.compute_fingerprint(
            reader.info.model_identity, reader.info.model_config, reader.info.prompt_mode, kv_dtype,
            reader.info.compute_dtype, kv_group=group,
        ),
    )  # fmt: skip
    names = [F.HIDDEN, *F.TRUTH_ARRAYS, F.THUMBS] + ([F.FRONT_IMAGE] if reader.has_front_images else [])
    writer = StoreWriter(dst, info)
    try:
        for sample_id in F.committed_samples(src) if sample_ids is None else sample_ids:
            arrays = F.encode_kv_arrays(float_kv(reader, sample_id), kv_dtype, group)
            arrays.update(reader.arrays(sample_id, names))
            writer.write(reader.sample_info(sample_id), arrays)
    finally:
        writer.close()
    return len(F.committed_samples(dst))
