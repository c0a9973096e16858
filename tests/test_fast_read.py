"""The fast read path: bitwise what zarr reads, damage refused by name, reused buffers, zeroed padding.

Samples are written with the project's own ``StoreWriter`` at tiny size (3 layers, 2 kv-heads, head dim
4) in every K/V dtype, with three prefix lengths in one batch so the padded (per-head scatter) and the
unpadded (one segment per K|V) placements are both exercised.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import chunks, fast_read
from alpamayo_cache.store import format as F
from alpamayo_cache.store.fast_read import PIECE, BatchReader, ChunkPlan, chunk_plan
from alpamayo_cache.store.reader import CorruptSample
from alpamayo_cache.store.writer import StoreWriter

LAYERS, HEADS, DIM, HIDDEN = 3, 2, 4, 6
LENGTHS = {"s-a": 7, "s-b": 5, "s-c": 3}  # the batch's longest is 7; max_len 9 leaves room unused
MAX_LEN = 9
GROUP = 2  # int4 group at this head dim: key groups 4, 3, 2 for the three lengths (padded in the batch)
DTYPES = ("bf16", "fp32", "fp8", "int8", "int4")
TRUTH_SHAPES = {F.HIST_XYZ: (16, 3), F.HIST_ROT: (16, 3, 3), F.FUT_XYZ: (64, 3), F.FUT_ROT: (64, 3, 3)}


def _write_store(root: Path, kv_dtype: str, seed: int) -> Path:
    info = F.StoreInfo(
        layout_version=F.LAYOUT_VERSION,
        model_name="fast-read-test",
        model_identity="test",
        model_config={},
        prompt_mode="traj-only",
        kv_dtype=kv_dtype,
        compute_dtype="float32",
        attn_implementation="sdpa",
        fingerprint=F.StoreInfo.compute_fingerprint("test", {}, "traj-only", kv_dtype, "float32"),
    )
    g = torch.Generator().manual_seed(seed)
    writer = StoreWriter(root, info)
    try:
        for sample_id, length in LENGTHS.items():
            kv = torch.randn(LAYERS, 2, HEADS, length, DIM, generator=g)
            kv[:, 0, :, :, 1] *= 20.0  # an outlier channel in K, as in real caches
            arrays = F.encode_kv_arrays(kv, kv_dtype, group=GROUP if kv_dtype == "int4" else None)
            arrays[F.HIDDEN] = torch.randn(HIDDEN, generator=g).numpy()
            for name, shape in TRUTH_SHAPES.items():
                arrays[name] = torch.randn(*shape, generator=g).numpy()
            arrays[F.ACTION] = torch.randn(64, 2, generator=g).numpy()
            sample = F.SampleInfo(sample_id, "clip", 0, "front", ["front"], "train", length, -3)
            writer.write(sample, arrays)
    finally:
        writer.close()
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fast_read")
    return {dt: _write_store(base / dt, dt, seed) for seed, dt in enumerate(DTYPES)}


def _batch(root: Path, ids: tuple[str, ...] = tuple(LENGTHS)) -> list[tuple[Path, str, int]]:
    return [(root / F.SAMPLES_DIR / i, i, LENGTHS[i]) for i in ids]


def _reader(kv_dtype: str, **kw) -> BatchReader:
    kw.setdefault("group", GROUP if kv_dtype == "int4" else None)
    return BatchReader(LAYERS, 3, HEADS, MAX_LEN, DIM, kv_dtype, **kw)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _assert_matches_zarr(batch, samples) -> None:
    for j, (sample_dir, _, length) in enumerate(samples):
        kv = zarr.open_array(str(sample_dir / F.KV), mode="r")[...]
        assert _bytes(batch.keys[:, j, :, :length]) == np.ascontiguousarray(kv[:, 0]).tobytes()
        assert _bytes(batch.values[:, j, :, :length]) == np.ascontiguousarray(kv[:, 1]).tobytes()
        for name in (F.HIDDEN, *F.TRUTH_ARRAYS):
            expected = zarr.open_array(str(sample_dir / name), mode="r")[...]
            assert getattr(batch, name)[j].numpy().tobytes() == expected.tobytes(), name
        if batch.kv_scale is not None:
            scale = zarr.open_array(str(sample_dir / F.KV_SCALE), mode="r")[...]
            assert batch.kv_scale[j].numpy().tobytes() == scale.tobytes()
        if batch.quant is not None:
            q = batch.quant
            for name, halves in ((F.K_QUANT, (q.k_scale, q.k_zero)), (F.V_QUANT, (q.v_scale, q.v_zero))):
                stored = zarr.open_array(str(sample_dir / name), mode="r")[...]
                rows = stored.shape[3]
                for i, half in enumerate(halves):
                    assert _bytes(half[:, j, :, :rows]) == np.ascontiguousarray(stored[:, i]).tobytes()
                    assert not half[:, j, :, rows:].view(torch.int16).any()  # padding rows are zero


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("threads,piece", [(1, PIECE), (2, PIECE), (2, 40)])  # 40 B: pieces cross heads
def test_bitwise_equal_to_zarr(stores, kv_dtype, threads, piece):
    samples = _batch(stores[kv_dtype])
    with _reader(kv_dtype, threads=threads, piece=piece) as reader:
        batch = reader.read(samples)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}.get(
        kv_dtype, torch.uint8
    )
    assert batch.keys.dtype == batch.values.dtype == dtype
    width = DIM // 2 if kv_dtype == "int4" else DIM
    assert batch.keys.shape == (LAYERS, 3, HEADS, 7, width) and batch.keys.is_contiguous()
    assert (batch.quant is None) == (kv_dtype not in ("int8", "int4"))
    if batch.quant is not None:
        k_rows = 1 if kv_dtype == "int8" else 4  # int8: one group over all tokens; int4: ceil(7 / 2)
        v_cols = 1 if kv_dtype == "int8" else DIM // GROUP
        assert batch.quant.k_scale.shape == (LAYERS, 3, HEADS, k_rows, DIM)
        assert batch.quant.v_zero.shape == (LAYERS, 3, HEADS, 7, v_cols)
    assert batch.lengths.tolist() == [7, 5, 3] and batch.sample_ids == list(LENGTHS)
    assert batch.hidden.shape == (3, HIDDEN) and batch.action.shape == (3, 64, 2)
    assert (batch.kv_scale is None) == (kv_dtype != "fp8")
    if batch.kv_scale is not None:
        assert batch.kv_scale.shape == (3, LAYERS, 2) and batch.kv_scale.dtype == torch.float32
    _assert_matches_zarr(batch, samples)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "int4"])
def test_padding_zeroed_and_buffers_reused(stores, kv_dtype):
    root = stores[kv_dtype]
    with _reader(kv_dtype, slots=2) as reader:
        first = reader.read(_batch(root, ("s-a", "s-a", "s-a")))  # slot 0, no padding
        first.keys.view(torch.uint8).fill_(0xFF)  # NaN bits in bf16 and e4m3fn: stale data is visible
        first.values.view(torch.uint8).fill_(0xFF)
        for t in first.quant.tensors() if first.quant else ():
            t.view(torch.uint8).fill_(0xFF)  # float16 NaN bits in the scales
        other = reader.read(_batch(root, ("s-b",)))  # slot 1
        again = reader.read(_batch(root))  # slot 0 again, padded
    assert again.keys.data_ptr() == first.keys.data_ptr() != other.keys.data_ptr()
    assert again.hidden.data_ptr() == first.hidden.data_ptr() != other.hidden.data_ptr()
    assert (first.slot, other.slot, again.slot) == (0, 1, 0)
    for j, length in enumerate(LENGTHS.values()):
        for t in (again.keys, again.values):
            assert not t[:, j, :, length:].view(torch.uint8).any()  # the pad region is zero bits
    assert torch.isfinite(again.keys.float()).all() and torch.isfinite(again.values.float()).all()
    _assert_matches_zarr(again, _batch(root))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped kv byte": ("kv/c.1.0.0.0.0", lambda p: _flip(p, 17), "crc32c"),
    "flipped hidden byte": ("hidden/c.0", lambda p: _flip(p, 3), "crc32c"),
    "flipped crc": ("action/c.0.0", lambda p: _flip(p, p.stat().st_size - 1), "crc32c"),
    "truncated kv": ("kv/c.2.0.0.0.0", lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated"),
    "extended kv": ("kv/c.0.0.0.0.0", lambda p: p.write_bytes(p.read_bytes() + b"\0"), "extended"),
    "missing kv chunk": ("kv/c.0.0.0.0.0", Path.unlink, "missing"),
    "missing scale": ("kv_scale", shutil.rmtree, "missing"),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused_by_name(stores, tmp_path, case, threads):
    root = tmp_path / "store"
    shutil.copytree(stores["fp8"] / F.SAMPLES_DIR, root / F.SAMPLES_DIR)
    target, damage, words = DAMAGE[case]
    damage(root / F.SAMPLES_DIR / "s-b" / target)
    with _reader("fp8", threads=threads) as reader:
        with pytest.raises(CorruptSample, match=f"sample s-b: .*{words}") as err:
            reader.read(_batch(root))
        array, _, chunk = target.partition("/")
        assert array in str(err.value) and chunk in str(err.value)
        _assert_matches_zarr(reader.read(_batch(root, ("s-a", "s-c"))), _batch(root, ("s-a", "s-c")))


def test_crc_without_the_ctypes_library(stores, tmp_path, monkeypatch):
    """Where libcrc32c can't be loaded, google_crc32c.extend (GIL held) checks the same bytes."""
    import google_crc32c

    assert fast_read.CRC_RELEASES_GIL  # this venv's google_crc32c wheel bundles libcrc32c
    monkeypatch.setattr(chunks, "_crc_extend", lambda crc, view, address: google_crc32c.extend(crc, view))
    root = tmp_path / "store"
    shutil.copytree(stores["bf16"] / F.SAMPLES_DIR, root / F.SAMPLES_DIR)
    with _reader("bf16", piece=40) as reader:
        _assert_matches_zarr(reader.read(_batch(root)), _batch(root))
        _flip(root / F.SAMPLES_DIR / "s-c" / "kv" / "c.2.0.0.0.0", 50)
        with pytest.raises(CorruptSample, match="sample s-c: kv chunk c.2.0.0.0.0 fails its crc32c"):
            reader.read(_batch(root))


def test_wrong_inputs_are_refused(stores):
    root = stores["bf16"]
    with _reader("bf16") as reader:
        with pytest.raises(CorruptSample, match="sample s-a: kv is uint16.* on disk, expected uint16"):
            reader.read([(root / F.SAMPLES_DIR / "s-a", "s-a", 6)])  # metadata length disagrees with kv
        with pytest.raises(UserError, match="1..3 samples"):
            reader.read(_batch(root) + _batch(root))
        with pytest.raises(UserError, match="not committed"):
            reader.read([(root / F.SAMPLES_DIR / "nope", "nope", 3)])
    with pytest.raises(UserError, match="max_len"), BatchReader(LAYERS, 1, HEADS, 6, DIM, "bf16") as short:
        short.read(_batch(root, ("s-a",)))
    with pytest.raises(CorruptSample, match="expected uint8"), _reader("fp8") as wrong_dtype:
        wrong_dtype.read(_batch(root))  # a bf16 store read as fp8


def test_chunk_plan_of_the_writers_arrays(stores):
    sample = stores["bf16"] / F.SAMPLES_DIR / "s-a"
    plan = chunk_plan(sample / F.KV)
    assert plan == ChunkPlan(sample / F.KV, (3, 2, 2, 7, 4), np.dtype("uint16"), (1, 2, 2, 7, 4))
    assert plan.chunk_names == ["c.0.0.0.0.0", "c.1.0.0.0.0", "c.2.0.0.0.0"]
    assert plan.chunk_nbytes == 2 * 2 * 7 * 4 * 2
    assert (sample / F.KV / "c.1.0.0.0.0").stat().st_size == plan.chunk_nbytes + 4
    hidden = chunk_plan(sample / F.HIDDEN)
    assert (hidden.shape, hidden.dtype, hidden.chunk_names) == ((6,), np.dtype("float32"), ["c.0"])
    fp8 = chunk_plan(stores["fp8"] / F.SAMPLES_DIR / "s-a" / F.KV)
    assert fp8.dtype == np.dtype("uint8")  # the bytes codec carries no endian for 1-byte types


OTHER_CHAINS = {
    "zstd + crc32c": dict(compressors=[ZstdCodec(), Crc32cCodec()]),
    "zstd only": dict(compressors=[ZstdCodec()]),
    "no crc": dict(compressors=None),
    "sharded": dict(compressors=[Crc32cCodec()], chunks=(2,), shards=(4,)),
    "big endian": dict(compressors=[Crc32cCodec()], serializer=BytesCodec(endian="big")),
    "'/' keys": dict(compressors=[Crc32cCodec()], chunk_key_encoding={"name": "default", "separator": "/"}),
    "v2 keys": dict(compressors=[Crc32cCodec()], chunk_key_encoding={"name": "v2", "separator": "."}),
}


@pytest.mark.parametrize("case", list(OTHER_CHAINS))
def test_other_layouts_have_no_plan(tmp_path, case):
    kw = {"chunks": (4,), "chunk_key_encoding": {"name": "default", "separator": "."}, **OTHER_CHAINS[case]}
    arr = zarr.create_array(store=str(tmp_path / "a"), shape=(8,), dtype="float32", **kw)
    arr[...] = np.arange(8, dtype=np.float32)
    assert chunk_plan(tmp_path / "a") is None
    v2 = zarr.create_array(store=str(tmp_path / "v2"), shape=(8,), dtype="float32", zarr_format=2)
    v2[...] = 1.0
    assert chunk_plan(tmp_path / "v2") is None and chunk_plan(tmp_path / "absent") is None


def test_unrecognised_arrays_go_through_zarr(stores, tmp_path, caplog):
    """A kv written with zstd and a hidden with '/' keys read bitwise the same, logged once each."""
    root = tmp_path / "store"
    shutil.copytree(stores["fp32"] / F.SAMPLES_DIR, root / F.SAMPLES_DIR)
    sample = root / F.SAMPLES_DIR / "s-b"
    for name, kw in [
        (F.KV, {"compressors": [ZstdCodec(), Crc32cCodec()]}),
        (F.HIDDEN, OTHER_CHAINS["'/' keys"]),
    ]:
        data = zarr.open_array(str(sample / name), mode="r")[...]
        shutil.rmtree(sample / name)
        chunks = (1, *data.shape[1:]) if name == F.KV else data.shape
        kw = {"chunk_key_encoding": {"name": "default", "separator": "."}, **kw}
        arr = zarr.create_array(
            store=str(sample / name), shape=data.shape, dtype=data.dtype, chunks=chunks, **kw
        )
        arr[...] = data
    assert chunk_plan(sample / F.KV) is None
    with caplog.at_level(logging.INFO, logger="alpamayo_cache"), _reader("fp32", threads=2) as reader:
        for _ in range(2):
            _assert_matches_zarr(reader.read(_batch(root)), _batch(root))
    lines = [r.getMessage() for r in caplog.records if "through zarr" in r.getMessage()]
    assert len(lines) == 2 and "kv of sample s-b" in lines[0] and "hidden of sample s-b" in lines[1]
    (sample / F.KV / "c.1.0.0.0.0").unlink()  # the fallback still refuses a missing chunk by name
    with pytest.raises(CorruptSample, match="sample s-b: kv has 1 missing chunk"), _reader("fp32") as reader:
        reader.read(_batch(root))
