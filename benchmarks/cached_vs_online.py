"""Training throughput from the feature store vs the seed approach (frozen VLM inside every step).

Three loops run the same trajectory head, batch size, optimizer and samples on the same machine, in
one process, in alternating rounds so drift on a shared machine hits all of them:
- cached: read K/V + ground truth from the zarr store (crc32c-checked), then the head step;
- online (frames in RAM): per step the Qwen-VL preprocessing and frozen VLM forward on frames decoded
  once up front, then the head step. This charges the online side nothing for data loading;
- seed: what the straightforward script does per step: load the sample from the dataset (decode the
  camera videos, interpolate egomotion), preprocessing, VLM forward, head step.

    python benchmarks/cached_vs_online.py [--model tiny] [--device cpu] [--steps 20] [--batch 4]

Prints samples/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alpamayo_cache.config import resolve_model
from alpamayo_cache.data.samples import load_sample
from alpamayo_cache.data.source import open_source
from alpamayo_cache.data.synthetic import write_dataset
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.head import init_head
from alpamayo_cache.model.policy import draw_noise
from alpamayo_cache.model.vlm import FrozenVLM, stack_prefixes
from alpamayo_cache.precompute import PrecomputeConfig
from alpamayo_cache.precompute import run as precompute
from alpamayo_cache.runtime import compute_dtype
from alpamayo_cache.store.dataset import collate
from alpamayo_cache.store.reader import StoreReader


def head_step(head, optimizer, prefix, action: torch.Tensor, generator: torch.Generator) -> float:
    t, noise = draw_noise(action.shape[0], 1, action.shape[1], generator)
    loss = head(prefix, action, t, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resolve_model(args.model)
    dtype = compute_dtype(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    write_dataset(work / "data", n_clips=8, cameras=model.cameras)
    store = work / "store"
    precompute(
        PrecomputeConfig(
            store=store,
            data=str(work / "data"),
            model=args.model,
            device=args.device,
            keyframes="stride:2",
            val_percent=0,
        )
    )
    reader = StoreReader(store)
    ids = sorted(reader.sample_infos())
    source = open_source(work / "data")
    from alpamayo_cache.data.samples import SampleSpec

    specs = [
        SampleSpec(i.clip_id, i.t0_us, i.camera_set, i.split) for i in (reader.sample_infos()[s] for s in ids)
    ]
    frames = [load_sample(source, s, model) for s in specs]  # decoded once: video decoding is not charged
    vlm = FrozenVLM(model, None, None, args.device, dtype)
    head = init_head(model).to(args.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            for k in range(0, len(ids) - args.batch + 1, args.batch):
                yield list(range(k, k + args.batch))

    def vlm_step(samples, idx: list[int]) -> None:
        """The seed approach's step: frozen VLM forward on every sample, then the head step."""
        prefix = stack_prefixes([vlm.encode(s.images, s.hist_xyz, "traj-only") for s in samples])
        action = torch.stack([reader.read(ids[i]).action for i in idx]).to(args.device)
        head_step(head, optimizer, prefix.to(args.device), action, g)

    def seed_loop(n: int) -> float:
        it = batches()
        start = time.perf_counter()
        for _ in range(n):
            idx = next(it)
            vlm_step([load_sample(source, specs[i], model) for i in idx], idx)
        return n * args.batch / (time.perf_counter() - start)

    def cached_loop(n: int) -> float:
        it = batches()
        start = time.perf_counter()
        for _ in range(n):
            batch = collate([reader.read(ids[i]) for i in next(it)])
            head_step(
                head, optimizer, Prefix.from_batch(batch).to(args.device), batch.action.to(args.device), g
            )
        return n * args.batch / (time.perf_counter() - start)

    def online_loop(n: int) -> float:
        it = batches()
        start = time.perf_counter()
        for _ in range(n):
            idx = next(it)
            vlm_step([frames[i] for i in idx], idx)
        return n * args.batch / (time.perf_counter() - start)

    loops = {"cached": cached_loop, "online": online_loop, "seed": seed_loop}
    for loop in loops.values():
        loop(2)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            rates[name].append(loop(args.steps))
    c, o, s = (statistics.median(rates[n]) for n in ("cached", "online", "seed"))
    print(
        f"model {model.name}, device {args.device}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds (median)"
    )
    print(f"cached (store):                     {c:8.1f} samples/s")
    print(f"online (VLM per step, frames in RAM): {o:6.1f} samples/s   ratio cached/online {c / o:5.1f}x")
    print(f"seed (decode + VLM per step):       {s:8.1f} samples/s   ratio cached/seed   {c / s:5.1f}x")


if __name__ == "__main__":
    main()
