"""Read throughput of real-size cached samples: a plain read of the chunk files vs the fast path vs today's path.

Writes N real-size samples (L=2,993 tokens, 36 layers x K|V x 8 kv-heads x 128: 441 MB in bf16, 221 MB in
fp8) with the project's own writer, then reads them back, page cache warm, in three ways:

  plain read   one thread, ``readinto`` every chunk file of the sample into one reused buffer, no crc
               (the yardstick: what the disk/page cache gives a single reader)
  fast path    ``store.fast_read.BatchReader`` (crc32c checked on every chunk), with 1 and N threads
  today        ``CachedFeatures`` + ``collate`` (zarr decode into fresh arrays, then a padded copy)

Repeats are interleaved (one pass of every path per round) so a busy shared machine slows all paths
alike; the best round counts. Reported per path: ms per sample, GB/s, ratio to the plain read, peak-RSS
growth per read and minor page faults per read (pages touched for the first time: a path that allocates
fresh buffers per read faults ~one per 4 KiB it reads; a reused buffer faults ~0).

    python benchmarks/real_size_io.py                      # 3 samples, bf16 and fp8, in a temp folder
    python benchmarks/real_size_io.py --samples 2 --repeats 3 --threads 1,2,4 --dir /scratch/io --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.store import fast_read
from alpamayo_cache.store import format as F
from alpamayo_cache.store.dataset import CachedFeatures, collate
from alpamayo_cache.store.writer import StoreWriter

# Alpamayo-R1's VLM text model (shared/REFERENCE.md section 1): the K/V that precompute caches.
LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 36, 8, 128, 4096
SMALL = (F.HIDDEN, *F.TRUTH_ARRAYS)


def write_store(root: Path, kv_dtype: str, n: int, length: int) -> list[str]:
    """n samples of random K/V of realistic magnitude: K ~ N(0, 1.5) with 4 outlier channels per head
    at ~15x (post-RoPE keys of Qwen-style models have a few such channels), V ~ N(0, 0.7)."""
    info = F.StoreInfo(
        layout_version=F.LAYOUT_VERSION,
        model_name="real-size-io",
        model_identity="benchmark",
        model_config={},
        prompt_mode="traj-only",
        kv_dtype=kv_dtype,
        compute_dtype="bfloat16",
        attn_implementation="sdpa",
        fingerprint=F.StoreInfo.compute_fingerprint("benchmark", {}, "traj-only", kv_dtype, "bfloat16"),
    )
    writer = StoreWriter(root, info)
    ids = [f"io-{i}" for i in range(n)]
    try:
        for i, sample_id in enumerate(ids):
            if (root / F.SAMPLES_DIR / sample_id).is_dir():
                continue  # kept from an earlier --keep run
            g = torch.Generator().manual_seed(i)
            bits = np.empty((LAYERS, 2, KV_HEADS, length, HEAD_DIM), F.disk_dtype(kv_dtype))
            scales = np.empty((LAYERS, 2), np.float32)
            for layer in range(LAYERS):  # one layer at a time keeps the float32 temporaries small
                kv = torch.randn(1, 2, KV_HEADS, length, HEAD_DIM, generator=g)
                kv[:, 0] *= 1.5
                kv[:, 0, :, :, :4] *= 15.0
                kv[:, 1] *= 0.7
                layer_bits, scale = F.encode_kv(kv, kv_dtype)
                bits[layer] = layer_bits[0]
                if scale is not None:
                    scales[layer] = scale[0]
            arrays = {F.KV: bits, F.HIDDEN: torch.randn(HIDDEN, generator=g).numpy()}
            for name, shape in [(F.HIST_XYZ, (16, 3)), (F.HIST_ROT, (16, 3, 3)), (F.FUT_XYZ, (64, 3))]:
                arrays[name] = torch.randn(*shape, generator=g).numpy()
            arrays[F.FUT_ROT] = torch.randn(64, 3, 3, generator=g).numpy()
            arrays[F.ACTION] = torch.randn(64, 2, generator=g).numpy()
            if kv_dtype == "fp8":
                arrays[F.KV_SCALE] = scales
            sample = F.SampleInfo(sample_id, "clip", 0, "front", ["front"], "train", length, -2592)
            writer.write(sample, arrays)
    finally:
        writer.close()
    return ids


def chunk_files(sample_dir: Path, kv_dtype: str) -> list[Path]:
    """The chunk files the training read touches (kv, the small arrays; not thumbnails or metadata)."""
    names = [F.KV, *SMALL] + ([F.KV_SCALE] if kv_dtype == "fp8" else [])
    return sorted(p for name in names for p in (sample_dir / name).iterdir() if p.name.startswith("c."))


def plain_reader(dirs: list[Path], kv_dtype: str) -> Callable[[], None]:
    files = [chunk_files(d, kv_dtype) for d in dirs]
    buffer = memoryview(bytearray(max(sum(f.stat().st_size for f in fs) for fs in files)))

    def run() -> None:
        for sample_files in files:
            pos = 0
            for path in sample_files:
                with open(path, "rb", buffering=0) as f:
                    pos += f.readinto(buffer[pos:])

    return run


def fast_reader(
    samples: list[tuple[Path, str, int]], kv_dtype: str, threads: int, micro_batch: int
) -> tuple[Callable[[], None], fast_read.BatchReader]:
    length = max(s[2] for s in samples)
    reader = fast_read.BatchReader(LAYERS, micro_batch, KV_HEADS, length, HEAD_DIM, kv_dtype, threads=threads)

    def run() -> None:
        for k in range(0, len(samples), micro_batch):
            reader.read(samples[k : k + micro_batch])

    return run, reader


def today_reader(root: Path, ids: list[str], micro_batch: int) -> Callable[[], None]:
    dataset = CachedFeatures(root, ids)

    def run() -> None:
        for k in range(0, len(ids), micro_batch):
            collate([dataset[i] for i in range(k, min(k + micro_batch, len(ids)))])

    return run


def measure(paths: dict[str, Callable[[], None]], repeats: dict[str, int], reads: int) -> dict[str, dict]:
    """Best-of-rounds seconds per pass, and per-read peak-RSS growth and minor faults over the timed passes."""
    stats = {name: {"best": float("inf"), "rss": 0.0, "faults": 0, "passes": 0} for name in paths}
    for run in paths.values():
        run()  # warm-up: page cache, lazily created buffers and thread pools
    for rnd in range(max(repeats.values())):
        for name, run in paths.items():
            if rnd >= repeats[name]:
                continue
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            s = stats[name]
            s["best"] = min(s["best"], seconds)
            s["rss"] += (after.ru_maxrss - before.ru_maxrss) / 1024  # ru_maxrss is KiB on Linux -> MiB
            s["faults"] += after.ru_minflt - before.ru_minflt
            s["passes"] += 1
    for s in stats.values():
        s["rss"] /= s["passes"] * reads
        s["faults"] /= s["passes"] * reads
    return stats


def bench_dtype(root: Path, kv_dtype: str, args: argparse.Namespace, threads: list[int]) -> None:
    """Write (or reuse) the samples of one K/V dtype, measure every path, print one table row each."""
    start = time.perf_counter()
    ids = write_store(root, kv_dtype, args.samples, args.length)
    written = time.perf_counter() - start
    dirs = [root / F.SAMPLES_DIR / i for i in ids]
    nbytes = sum(p.stat().st_size for d in dirs for p in chunk_files(d, kv_dtype)) / len(ids)
    samples = [(d, i, args.length) for d, i in zip(dirs, ids, strict=True)]

    paths = {"plain read (1 thread, no crc)": plain_reader(dirs, kv_dtype)}
    readers = []
    for t in threads:
        run, reader = fast_reader(samples, kv_dtype, t, args.micro_batch)
        paths[f"fast path, {t} thread(s), crc"] = run
        readers.append(reader)
    today = "today: CachedFeatures + collate"
    paths[today] = today_reader(root, ids, args.micro_batch)
    repeats = {name: args.today_repeats if name == today else args.repeats for name in paths}
    stats = measure(paths, repeats, len(ids))
    for reader in readers:
        reader.close()

    plain = stats["plain read (1 thread, no crc)"]["best"]
    for name, s in stats.items():
        per = s["best"] / len(ids)  # seconds per sample
        print(
            f"| {kv_dtype} | {name} | {per * 1e3:.0f} | {nbytes / per / 1e9:.2f} | {plain / s['best']:.2f} "
            f"| {s['rss']:.1f} | {s['faults']:.0f} |"
        )
    print(f"({kv_dtype}: {len(ids)} samples of {nbytes / 1e6:.0f} MB; writing took {written:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--length", type=int, default=2993, help="prefix tokens L")
    parser.add_argument("--dtypes", default="bf16,fp8")
    parser.add_argument("--repeats", type=int, default=5, help="rounds for the plain read and the fast path")
    parser.add_argument("--today-repeats", type=int, default=2, help="rounds for today's (slow) path")
    default_threads = fast_read.default_threads()
    parser.add_argument("--threads", default=",".join(map(str, sorted({1, default_threads}))))
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written samples (reused by --dir)")
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {platform.platform()} | {cpu} | os.cpu_count()={os.cpu_count()} | python {sys.version.split()[0]}"
    )
    crc = "ctypes libcrc32c, GIL released" if fast_read.CRC_RELEASES_GIL else "google_crc32c.extend, GIL held"
    print(f"torch {torch.__version__} | crc32c: {crc} | default threads {default_threads}")
    print(
        f"micro-batch {args.micro_batch}, page cache warm, best of {args.repeats} rounds ({args.today_repeats} for today)"
    )
    dtypes = args.dtypes.split(",")
    base = args.dir or Path(tempfile.mkdtemp(prefix="real_size_io-"))
    created = [base / dt for dt in dtypes if not (base / dt).exists()]  # what this run writes
    try:
        print(
            "| dtype | path | ms/sample | GB/s | ratio to plain | peak-RSS growth MiB/read | minor faults/read |"
        )
        print("|---|---|---|---|---|---|---|")
        for kv_dtype in dtypes:
            bench_dtype(base / kv_dtype, kv_dtype, args, [int(t) for t in args.threads.split(",")])
    finally:
        if not args.keep:
            for path in [base] if args.dir is None else created:
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
