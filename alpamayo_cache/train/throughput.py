"""The plan's throughput model: is a run bound by reading the store or by compute, and how long will it take?

- read speed: a short probe (``PROBE_S``, a few hundred ms at most) reads one training sample's chunk files
  through the fast path (``chunks.read_chunk``: preadv + crc32c, the reader's threads) into one reused
  buffer. Whether the files were in the page cache is unknown; a first probe of a cold store measures the disk.
- bytes per sample: the sizes of the files the feed reads (K/V and its scales, hidden, trajectories).
- compute per sample: ``COMPUTE_S_PER_SAMPLE`` below, per (model size, device kind), scaled by
  ``--draws-per-sample`` (an upper bound: the K/V read and its dequantisation are shared by the draws).
- with the feed reading ahead, a step takes the longer of the two: samples/s = 1 / max(read, compute).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.runtime import human_bytes
from alpamayo_cache.store import format as F
from alpamayo_cache.store.chunks import CRC_BYTES, read_chunk
from alpamayo_cache.store.fast_read import default_threads

PROBE_S = 0.3
# Seconds of one training step per sample and draw (forward + backward + optimizer share), by model size and
# device kind. Where a pair is missing the plan names no bound for compute.
COMPUTE_S_PER_SAMPLE = {
    # Measured: tiny preset, fp32, micro-batch 4, scope all, one thread: the step's CPU time per sample
    # (time.thread_time, median of 35 steps; 2-core shared VM, Dec 2026). Wall time is this only on an idle
    # core: the same steps took ~8x longer in wall time while other jobs loaded the machine. 4 draws: 3.4x.
    ("tiny", "cpu"): 0.0053,
    # Estimate, not measured here: ~14 ms of expert compute per real-size sample on an RTX 4090 (issue 13).
    ("real-size", "cuda"): 0.014,
}
HOST_SHARE = 0.25  # the feed's ring may take at most this share of the host's memory


def size_class(model: ModelConfig) -> str:
    """'real-size' for the Alpamayo-R1 expert's dimensions (any checkpoint of them), else the preset name."""
    if (model.text.num_layers, model.text.num_kv_heads, model.expert.hidden_size) == (36, 8, 2048):
        return "real-size"
    return model.name


def feed_files(sample_dir: Path) -> list[Path]:
    """The chunk files the training feed reads for one sample (not thumbnails or metadata)."""
    names = [F.KV, F.KV_SCALE, F.K_QUANT, F.V_QUANT, F.HIDDEN, *F.TRUTH_ARRAYS]
    return sorted(p for n in names if (sample_dir / n).is_dir() for p in (sample_dir / n).glob("c.*"))


def probe_read(sample_dir: Path, budget_s: float = PROBE_S) -> tuple[int, float]:
    """(bytes, seconds) of reading ``sample_dir``'s feed files through the fast path, stopping after
    ``budget_s`` (whole files, ``threads`` at a time, each into its own reused buffer)."""
    files = feed_files(sample_dir)
    if not files:
        return 0, 0.0
    threads = default_threads()
    size = max(p.stat().st_size for p in files) - CRC_BYTES
    buffers = [np.empty(size, np.uint8) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(int, range(threads)))  # start the threads before the clock does
        done, start = 0, time.perf_counter()
        for k in range(0, len(files), threads):
            wave = files[k : k + threads]
            jobs = []
            for path, buffer in zip(wave, buffers, strict=False):
                payload = path.stat().st_size - CRC_BYTES
                jobs.append(
                    pool.submit(
                        read_chunk,
                        path,
                        [buffer[:payload]],
                        sample_id=sample_dir.name,
                        array=path.parent.name,
                    )
                )
                done += payload + CRC_BYTES
            for job in jobs:
                job.result()
            if time.perf_counter() - start > budget_s:
                break
        seconds = time.perf_counter() - start
    return done, seconds


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class Throughput:
    bytes_per_sample: int
    read_bytes_per_s: float  # probe
    probe_bytes: int
    compute_s_per_sample: float | None  # None: no table entry for this model and device
    compute_source: str
    samples_per_step: int
    steps: int
    prefetch: int
    ring_bytes: int

    @property
    def read_s_per_sample(self) -> float:
        return self.bytes_per_sample / self.read_bytes_per_s if self.read_bytes_per_s else float("inf")

    @property
    def bound(self) -> str:
        if self.compute_s_per_sample is None:
            return "unknown (no compute figure for this model and device)"
        return "reading the store" if self.read_s_per_sample > self.compute_s_per_sample else "compute"

    @property
    def samples_per_s(self) -> float:
        slowest = max(self.read_s_per_sample, self.compute_s_per_sample or 0.0)
        return 1.0 / slowest if slowest else float("inf")

    def describe(self) -> str:
        compute = (
            f"{self.compute_s_per_sample * 1e3:.1f} ms/sample ({self.compute_source})"
            if self.compute_s_per_sample is not None
            else "no figure for this model and device"
        )
        wall = self.steps * self.samples_per_step / self.samples_per_s if self.samples_per_s else float("inf")
        return (
            f"  throughput: {human_bytes(self.bytes_per_sample)} per sample; read probe "
            f"{human_bytes(int(self.read_bytes_per_s))}/s over {human_bytes(self.probe_bytes)} "
            f"-> {self.read_s_per_sample * 1e3:.1f} ms/sample; compute {compute}\n"
            f"  bound: {self.bound}; expected {self.samples_per_s:.1f} samples/s, {wall:.0f} s for "
            f"{self.steps} steps of {self.samples_per_step} samples\n"
            f"  feed: {self.prefetch} batch(es) read ahead, ring of {self.prefetch + 1} x "
            f"{human_bytes(self.ring_bytes // (self.prefetch + 1))} host memory"
        )


def throughput(cfg, model: ModelConfig, sample_dir: Path, device: str) -> Throughput | None:
    """The throughput model of ``cfg`` (a TrainConfig) reading samples like ``sample_dir`` on ``device``;
    None when the sample holds no chunk files to probe (a metadata-only store, as plan tests make)."""
    per_sample = sum(p.stat().st_size for p in feed_files(sample_dir))
    if per_sample == 0:
        return None
    probe_bytes, seconds = probe_read(sample_dir)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    base = COMPUTE_S_PER_SAMPLE.get((size_class(model), kind))
    source = "measured" if kind == "cpu" else "RTX 4090 estimate"
    compute = None if base is None else base * cfg.draws_per_sample
    if compute is not None and cfg.draws_per_sample > 1:
        source += f", x{cfg.draws_per_sample} draws"
    batch_bytes = cfg.micro_batch * per_sample
    prefetch = cfg.prefetch
    if prefetch < 1:  # 2 ahead when the ring (prefetch + 1 batches) fits the host's share, else 1
        budget = HOST_SHARE * host_memory() if host_memory() else float("inf")
        prefetch = 2 if 3 * batch_bytes <= budget else 1
    return Throughput(
        bytes_per_sample=per_sample,
        read_bytes_per_s=probe_bytes / seconds if seconds > 0 else 0.0,
        probe_bytes=probe_bytes,
        compute_s_per_sample=compute,
        compute_source=source,
        samples_per_step=cfg.micro_batch * cfg.grad_accum,  # per process
        steps=cfg.steps,
        prefetch=prefetch,
        ring_bytes=(prefetch + 1) * batch_bytes,
    )
