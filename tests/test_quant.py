"""int8/int4 K/V: exact codes on a hand-made layer, error bounds with outlier channels, dequantisation
of a padded batch equal to each sample's own, and stores that train, verify and refuse damage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.store import format as F
from alpamayo_cache.store import quant as Q
from alpamayo_cache.store.dataset import CachedFeatures, collate
from alpamayo_cache.store.reader import CorruptSample, StoreReader
from alpamayo_cache.store.transcode import transcode
from alpamayo_cache.store.verify import verify
from tests.conftest import precompute_cfg


def test_codes_of_a_hand_made_layer():
    # K [h=1, L=3, d=2]: channel 0 spans [-1, 2], channel 1 is constant 5 (decodes exactly).
    keys = torch.tensor([[[-1.0, 5.0], [0.5, 5.0], [2.0, 5.0]]])
    values = torch.tensor([[[0.0, 1.0], [-3.0, 3.0], [4.0, 4.0]]])  # per token: [0,1], [-3,3], [4,4]
    codes, k_quant, v_quant = Q.quantize_layer(keys, values, "int8", 0)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 1, 3, 2)
    assert codes[0, 0].tolist() == [[0, 0], [128, 0], [255, 0]]  # (0.5 + 1) / (3 / 255) = 127.5 -> 128
    assert codes[1, 0].tolist() == [[0, 255], [0, 255], [0, 0]]
    assert k_quant.shape == (2, 1, 1, 2) and v_quant.shape == (2, 1, 3, 1)
    assert k_quant[1, 0, 0].tolist() == [-1.0, 5.0]  # zeros = the group minima
    assert v_quant[1, 0, :, 0].tolist() == [0.0, -3.0, 4.0]
    packed, _, _ = Q.quantize_layer(keys, values, "int4", 2)  # groups of 2 tokens / 2 channels
    assert packed.shape == (2, 1, 3, 1)
    assert torch.equal(
        Q.unpack4(Q.pack4(torch.tensor([[3, 12, 15, 0]], dtype=torch.uint8))),
        torch.tensor([[3, 12, 15, 0]], dtype=torch.uint8),
    )


def _outlier_kv(layers: int = 2, length: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, 4, length, 64, generator=g)
    kv[:, 0] *= 1.5
    kv[:, 0, :, :, :4] *= 15.0  # outlier key channels
    kv[:, 1] *= 0.7
    return kv


@pytest.mark.parametrize("kv_dtype,low,high", [("int8", 0.006, 0.010), ("int4", 0.06, 0.09)])
def test_relative_error_with_outlier_channels(kv_dtype, low, high):
    kv = _outlier_kv()
    codes, k_quant, v_quant = Q.quantize(kv, kv_dtype, Q.default_group(kv_dtype))
    quant = Q.KVQuant(kv_dtype, Q.default_group(kv_dtype), k_quant[:, 0, None], k_quant[:, 1, None],
                      v_quant[:, 0, None], v_quant[:, 1, None])  # fmt: skip
    out = torch.stack(
        [
            torch.stack(quant.dequantize(i, codes[i, 0][None], codes[i, 1][None], torch.float32))
            for i in range(2)
        ]
    )[:, :, 0]
    error = float((out - kv).norm() / kv.norm())
    assert low < error < high, error  # int8 ~0.8%, int4 (groups of 32) ~7.8%: store/quant.py's table


def test_precompute_equals_transcode_from_fp32(synthetic_data, tiny_store, tmp_path):
    """precompute --kv-dtype int4 encodes on the compute device; re-encoding the fp32 store gives the same bytes."""
    store = tmp_path / "int4"
    precompute(precompute_cfg(synthetic_data, store, keyframes="stride:1.5", kv_dtype="int4", limit=1))
    made = StoreReader(store)
    assert made.info.kv_group == 16  # the tiny preset's head dim (< 32)
    made_ids = sorted(made.sample_infos())
    assert transcode(tiny_store, tmp_path / "re", "int4", made_ids) == len(made_ids) == 3
    again = StoreReader(tmp_path / "re")
    assert again.info.fingerprint == made.info.fingerprint
    for sample_id in made.sample_infos():
        for name in (F.KV, F.K_QUANT, F.V_QUANT):
            assert np.array_equal(made.arrays(sample_id, [name])[name], again.arrays(sample_id, [name])[name])


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_store_round_trip_and_verify(tiny_store, tmp_path, kv_dtype):
    store = tmp_path / kv_dtype
    ref_ids = sorted(StoreReader(tiny_store).sample_infos())
    transcode(tiny_store, store, kv_dtype, ref_ids[:3] + ref_ids[-2:])
    reader, ref = StoreReader(store), StoreReader(tiny_store)
    assert reader.info.kv_dtype == kv_dtype and reader.info.kv_group == Q.default_group(kv_dtype, 16)
    assert reader.info.fingerprint != ref.info.fingerprint
    ids = sorted(reader.sample_infos())[:3]
    samples = [reader.read(i) for i in ids]
    assert samples[0].keys.dtype == torch.uint8  # codes stay codes until the device
    batch = collate(samples)
    dataset = CachedFeatures(store, ids, reader)
    with dataset.batch_reader(micro_batch=3, threads=2) as fast:
        fast_batch = dataset.read_batch(fast, [0, 1, 2])
        a, b = Prefix.from_batch(batch), Prefix.from_batch(fast_batch)
        for layer in range(len(samples[0].keys)):
            ka, va = a.layer(layer, torch.float32)
            kb, vb = b.layer(layer, torch.float32)
            assert torch.equal(ka, kb) and torch.equal(va, vb)  # fast path == per-sample path
    full = Prefix.from_batch(collate([ref.read(i) for i in ids]))
    k, _ = a.layer(0, torch.float32)
    exact, _ = full.layer(0, torch.float32)
    rel = float((k - exact).norm() / exact.norm())
    assert 0 < rel < (0.02 if kv_dtype == "int8" else 0.2)
    assert verify(store).ok and a.all_finite()
    a.quant.v_zero[0, 0, 0, 0, 0] = float("nan")  # a damaged scale is caught before the model sees it
    assert not a.all_finite()
    chunk = store / F.SAMPLES_DIR / ids[0] / F.V_QUANT / "c.0.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0x20
    chunk.write_bytes(bytes(data))
    assert list(verify(store).problems) == [ids[0]]
    with pytest.raises(CorruptSample, match=ids[0]):
        reader.read(ids[0])


def test_real_size_bytes_and_the_dry_run_table(synthetic_data, tmp_path, caplog):
    import logging

    shapes = F.kv_array_shapes(36, 8, 128, 2993, "int4", 32)
    assert shapes == {
        F.KV: (36, 2, 8, 2993, 64),
        F.K_QUANT: (36, 2, 8, 94, 128),
        F.V_QUANT: (36, 2, 8, 2993, 4),
    }
    # block=1 counts payload bytes (no rounding to filesystem blocks), so the differences are exact.
    sizes = {dt: F.sample_bytes(2993, 36, 8, 128, dt, 4096, 4, block=1) for dt in F.KV_ITEMSIZE}
    codes, per_array = 36 * 2 * 8 * 2993 * 128, 4 + 900 + 1  # one byte per code; crc, zarr.json, folder
    int8_scales = (
        36 * 2 * 8 * 1 * 128 * 2 + 36 * 2 * 8 * 2993 * 1 * 2 + 2 * per_array
    )  # float16 (scale, zero)
    int4_scales = 36 * 2 * 8 * 94 * 128 * 2 + 36 * 2 * 8 * 2993 * 4 * 2 + 2 * per_array
    assert sizes["bf16"] - sizes["int8"] == codes - int8_scales
    assert sizes["int8"] - sizes["int4"] == codes // 2 + int8_scales - int4_scales
    on_disk = {dt: F.sample_bytes(2993, 36, 8, 128, dt, 4096, 4) for dt in F.KV_ITEMSIZE}  # 4 KiB blocks
    assert [round(on_disk[d] / 1e6) for d in ("bf16", "fp8", "int8", "int4")] == [442, 221, 225, 138]
    with caplog.at_level(logging.INFO, logger="alpamayo_cache"):
        precompute(precompute_cfg(synthetic_data, tmp_path / "store", dry_run=True, kv_dtype="int8"))
    table = next(r.getMessage() for r in caplog.records if "K/V options" in r.getMessage())
    assert all(f"  {dt} " in table for dt in F.KV_ITEMSIZE) and "<- this run" in table.split("int8")[1]
    assert not (tmp_path / "store").exists()
