"""Read throughput of real-size cached samples: the trainer's input pipeline vs a plain read of the same files.

Writes N real-size samples (L=2,993 tokens, 36 layers x K|V x 8 kv-heads x 128: 441 MB in bf16, 221 MB in
fp8, 224 MB in int8, 138 MB in int4 with its scales) with the project's own writer, then reads them back,
page cache warm, in these ways:

  plain read       one thread, ``readinto`` every file the feed reads into one reused buffer, no crc
                   (the yardstick: what the disk/page cache gives a single reader)
  trainer feed     ``train.feed.Feed`` exactly as ``train`` runs it: a reader thread filling the
                   ``BatchReader`` ring ``--prefetch`` batches ahead, crc32c on every chunk; the loop side
                   only takes batches (no compute), so this is the pipeline's own ceiling
  BatchReader      the fast reader alone, called synchronously, with 1 and N threads
  DataLoader       worker processes (``--loader-dtypes``): over the fast reader (each batch cloned, then
                   moved through shared memory by the DataLoader) and over per-sample zarr + collate
  per-sample zarr  ``CachedFeatures`` + ``collate`` in one process (the trainer's read before issue 13)

Repeats are interleaved (one pass of every path per round) so a busy shared machine slows all paths
alike; the best round counts. Reported per path: ms per sample, GB/s, ratio to the plain read, peak-RSS
growth per sample read and minor page faults per sample (pages touched for the first time: a path that
allocates fresh buffers per read faults ~one per 4 KiB it reads; a reused buffer faults ~0).

    python benchmarks/real_size_io.py                      # 3 samples, every dtype, in a temp folder
    python benchmarks/real_size_io.py --dtypes bf16,fp8 --repeats 3 --threads 1,2,4 --dir /scratch/io --keep
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

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.store import fast_read
from alpamayo_cache.store import format as F
from alpamayo_cache.store import quant as Q
from alpamayo_cache.store.dataset import CachedFeatures, collate
from alpamayo_cache.store.writer import StoreWriter
from alpamayo_cache.train.checkpoints import TrainState
from alpamayo_cache.train.feed import Feed
from alpamayo_cache.train.throughput import feed_files

# Alpamayo-R1's VLM text model (shared/REFERENCE.md section 1): the K/V that precompute caches.
LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 36, 8, 128, 4096


def write_store(root: Path, kv_dtype: str, n: int, length: int) -> list[str]:
    """n samples of random K/V of realistic magnitude: K ~ N(0, 1.5) with 4 outlier channels per head
    at ~15x (post-RoPE keys of Qwen-style models have a few such channels), V ~ N(0, 0.7)."""
    group = Q.default_group(kv_dtype, HEAD_DIM)
    info = F.StoreInfo(
        layout_version=F.LAYOUT_VERSION,
        model_name="real-size-io",
        model_identity="benchmark",
        model_config={"text": {"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM}},
        prompt_mode="traj-only",
        kv_dtype=kv_dtype,
        compute_dtype="bfloat16",
        attn_implementation="sdpa",
        fingerprint=F.StoreInfo.compute_fingerprint(
            "benchmark", {}, "traj-only", kv_dtype, "bfloat16", group
        ),
        kv_group=group,
    )
    writer = StoreWriter(root, info)
    ids = [f"io-{i}" for i in range(n)]
    try:
        for i, sample_id in enumerate(ids):
            if (root / F.SAMPLES_DIR / sample_id).is_dir():
                continue  # kept from an earlier --keep run
            g = torch.Generator().manual_seed(i)
            layers: dict[str, list[np.ndarray]] = {}
            for _ in range(LAYERS):  # one layer at a time keeps the float32 temporaries small
                kv = torch.randn(1, 2, KV_HEADS, length, HEAD_DIM, generator=g)
                kv[:, 0] *= 1.5
                kv[:, 0, :, :, :4] *= 15.0
                kv[:, 1] *= 0.7
                for name, value in F.encode_kv_arrays(kv, kv_dtype, group).items():
                    layers.setdefault(name, []).append(value)
            arrays = {name: np.concatenate(parts) for name, parts in layers.items()}
            arrays[F.HIDDEN] = torch.randn(HIDDEN, generator=g).numpy()
            for name, shape in [(F.HIST_XYZ, (16, 3)), (F.HIST_ROT, (16, 3, 3)), (F.FUT_XYZ, (64, 3))]:
                arrays[name] = torch.randn(*shape, generator=g).numpy()
            arrays[F.FUT_ROT] = torch.randn(64, 3, 3, generator=g).numpy()
            arrays[F.ACTION] = torch.randn(64, 2, generator=g).numpy()
            sample = F.SampleInfo(sample_id, "clip", 0, "front", ["front"], "train", length, -2592)
            writer.write(sample, arrays)
    finally:
        writer.close()
    return ids


def plain_reader(dirs: list[Path]) -> Callable[[], float]:
    """One thread, ``readinto`` every file the feed reads into one reused buffer, no crc."""
    files = [feed_files(d) for d in dirs]
    buffer = memoryview(bytearray(max(sum(f.stat().st_size for f in fs) for fs in files)))

    def run() -> float:
        for sample_files in files:
            pos = 0
            for path in sample_files:
                with open(path, "rb", buffering=0) as f:
                    pos += f.readinto(buffer[pos:])
        return len(dirs)

    return run


def fast_reader(
    dataset: CachedFeatures, threads: int, micro_batch: int
) -> tuple[Callable[[], float], object]:
    """``BatchReader`` alone, called synchronously."""
    reader = dataset.batch_reader(micro_batch, slots=2, threads=threads)
    order = list(range(len(dataset)))

    def run() -> float:
        for k in range(0, len(order), micro_batch):
            dataset.read_batch(reader, order[k : k + micro_batch])
        return len(order)

    return run, reader


def feed_reader(
    dataset: CachedFeatures, micro_batch: int, prefetch: int, epochs: int
) -> tuple[Callable[[], float], Feed]:
    """The trainer's input pipeline as ``train`` runs it: ``train.feed.Feed`` (reader thread, ring of
    prefetch + 1 slots, crc on every chunk); the loop's side only takes batches. Batches the reader had
    finished before the round started are not counted (the round's time holds none of their reading)."""
    cfg = TrainConfig(store=dataset.root, micro_batch=micro_batch, seed=0)
    feed = Feed(dataset, cfg, TrainState(), 0, 1, prefetch=prefetch)
    batches = max(
        epochs * -(-len(dataset) // micro_batch), 5 * (prefetch + 1)
    )  # the ready ones a small share

    def run() -> float:
        ready = feed._ready.qsize()
        taken = 0
        for _ in range(batches):
            taken += len(next(feed)[2].sample_ids)
        return taken - ready * micro_batch

    return run, feed


class _BatchDataset(torch.utils.data.Dataset):
    """DataLoader item = one micro-batch read by a ``BatchReader`` inside the worker process, cloned into
    fresh memory (the DataLoader moves it into shared memory; a ring slot would be overwritten under it)."""

    def __init__(self, dataset: CachedFeatures, micro_batch: int) -> None:
        self.dataset, self.micro_batch, self.reader = dataset, micro_batch, None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.micro_batch)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if self.reader is None:
            self.reader = self.dataset.batch_reader(self.micro_batch, slots=1, threads=1)
        idx = list(range(k * self.micro_batch, min((k + 1) * self.micro_batch, len(self.dataset))))
        batch = self.dataset.read_batch(self.reader, idx)
        return {"keys": batch.keys.clone(), "values": batch.values.clone(), "action": batch.action.clone()}


def loader_reader(
    dataset: CachedFeatures, micro_batch: int, workers: int, fast: bool, epochs: int
) -> Callable[[], float]:
    """DataLoader worker processes (prefetch_factor 2, persistent): over the fast reader (``fast``) or over
    per-sample zarr reads + collate (the trainer's feed before issue 13)."""
    from torch.utils.data import DataLoader

    if fast:
        loader = DataLoader(_BatchDataset(dataset, micro_batch), batch_size=None, num_workers=workers,
                            prefetch_factor=2, persistent_workers=True)  # fmt: skip
    else:
        order = [
            list(range(k, min(k + micro_batch, len(dataset)))) for k in range(0, len(dataset), micro_batch)
        ]
        loader = DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=workers,
                            prefetch_factor=2, persistent_workers=True)  # fmt: skip

    def run() -> float:
        for _ in range(epochs):
            for _batch in loader:
                pass
        return epochs * len(dataset)

    return run


def today_reader(dataset: CachedFeatures, micro_batch: int) -> Callable[[], float]:
    def run() -> float:
        for k in range(0, len(dataset), micro_batch):
            collate([dataset[i] for i in range(k, min(k + micro_batch, len(dataset)))])
        return len(dataset)

    return run


def measure(paths: dict[str, Callable[[], float]], repeats: dict[str, int]) -> dict[str, dict]:
    """Best-of-rounds seconds per sample, and per-sample peak-RSS growth and minor faults over the rounds."""
    stats = {name: {"best": float("inf"), "rss": 0.0, "faults": 0.0, "samples": 0.0} for name in paths}
    for run in paths.values():
        run()  # warm-up: page cache, lazily created buffers, thread pools and worker processes
    for rnd in range(max(repeats.values())):
        for name, run in paths.items():
            if rnd >= repeats[name]:
                continue
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            samples = max(run(), 1e-9)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            s = stats[name]
            s["best"] = min(s["best"], seconds / samples)
            s["rss"] += (after.ru_maxrss - before.ru_maxrss) / 1024  # ru_maxrss is KiB on Linux -> MiB
            s["faults"] += after.ru_minflt - before.ru_minflt
            s["samples"] += samples
    for s in stats.values():
        s["rss"] /= s["samples"]
        s["faults"] /= s["samples"]
    return stats


def bench_dtype(root: Path, kv_dtype: str, args: argparse.Namespace, threads: list[int]) -> dict[str, dict]:
    """Write (or reuse) the samples of one K/V dtype, measure every path, print one table row each."""
    start = time.perf_counter()
    ids = write_store(root, kv_dtype, args.samples, args.length)
    written = time.perf_counter() - start
    dataset = CachedFeatures(root, ids)
    dirs = [root / F.SAMPLES_DIR / i for i in ids]
    nbytes = sum(p.stat().st_size for d in dirs for p in feed_files(d)) / len(ids)

    plain, feed_name = "plain read (1 thread, no crc)", f"trainer feed (prefetch {args.prefetch}, crc)"
    paths = {plain: plain_reader(dirs), feed_name: None}
    closers = []
    run, feed = feed_reader(dataset, args.micro_batch, args.prefetch, args.epochs)
    paths[feed_name] = run
    closers.append(feed.close)
    for t in threads:
        run, reader = fast_reader(dataset, t, args.micro_batch)
        paths[f"BatchReader alone, {t} thread(s), crc"] = run
        closers.append(reader.close)
    if kv_dtype in args.loader_dtypes.split(","):
        for fast in (True, False):
            what = "BatchReader + clone" if fast else "zarr + collate"
            name = f"DataLoader, {args.workers} worker processes ({what})"
            paths[name] = loader_reader(dataset, args.micro_batch, args.workers, fast, args.epochs)
    today = "per-sample zarr + collate (1 process)"
    paths[today] = today_reader(dataset, args.micro_batch)
    repeats = {name: args.today_repeats if name == today else args.repeats for name in paths}
    try:
        stats = measure(paths, repeats)
    finally:
        for close in closers:
            close()

    best_plain = stats[plain]["best"]
    for name, s in stats.items():
        print(
            f"| {kv_dtype} | {name} | {s['best'] * 1e3:.0f} | {nbytes / s['best'] / 1e9:.2f} | {best_plain / s['best']:.2f} "
            f"| {s['rss']:.1f} | {s['faults']:.0f} |"
        )
    print(f"({kv_dtype}: {len(ids)} samples of {nbytes / 1e6:.0f} MB; writing took {written:.0f} s)")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--length", type=int, default=2993, help="prefix tokens L")
    parser.add_argument("--dtypes", default="bf16,fp8,int8,int4")
    parser.add_argument("--repeats", type=int, default=5, help="rounds for every path but the per-sample one")
    parser.add_argument("--today-repeats", type=int, default=1, help="rounds for the per-sample zarr path")
    parser.add_argument(
        "--epochs", type=int, default=4, help="passes over the samples per feed/DataLoader round"
    )
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--loader-dtypes", default="bf16", help="dtypes that also measure DataLoader workers")
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
        f"micro-batch {args.micro_batch}, page cache warm, best of {args.repeats} rounds ({args.today_repeats} "
        f"for the per-sample path); feed and DataLoader rounds take {args.epochs} passes over the samples"
    )
    dtypes = args.dtypes.split(",")
    base = args.dir or Path(tempfile.mkdtemp(prefix="real_size_io-"))
    created = [base / dt for dt in dtypes if not (base / dt).exists()]  # what this run writes
    try:
        print(
            "| dtype | path | ms/sample | GB/s | ratio to plain | peak-RSS growth MiB/sample | minor faults/sample |"
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
