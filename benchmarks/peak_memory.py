"""Peak memory of one real-size training step of the trajectory head (alpamayo-r1-10b dimensions).

On CUDA: torch.cuda.max_memory_allocated for micro-batch 1 and 4, with/without gradient
checkpointing, AdamW vs 8-bit AdamW (bitsandbytes), random weights, cached K/V of length 2,993.
On CPU (no GPU lent): the process's peak RSS for micro-batch 1 in bf16 with a state-free SGD step
(AdamW's fp32 moments would not fit this 24 GiB machine next to the weights), compared with the
memory plan's weights + grads + K/V + activations terms. Each configuration runs in its own process.

    python benchmarks/peak_memory.py                 # all configurations for this machine
    python benchmarks/peak_memory.py --one --micro-batch 1 --checkpointing on --optimizer sgd
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from alpamayo_cache.config import REAL
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.policy import Policy, draw_noise
from alpamayo_cache.train.plan import GIB
from alpamayo_cache.train.plan import plan as memory_plan

L = 2993


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def one(micro_batch: int, checkpointing: bool, optimizer_name: str, device: str) -> dict:
    torch.manual_seed(0)
    base_rss = rss_gib()
    with torch.device("meta"):
        head = Policy(REAL)
    head = head.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.02)
    head.gradient_checkpointing = checkpointing
    head.train()
    t = REAL.text
    keys = torch.randn(
        t.num_layers, micro_batch, t.num_kv_heads, L, t.head_dim, dtype=torch.bfloat16, device=device
    )
    prefix = Prefix(
        keys, torch.randn_like(keys), torch.full((micro_batch,), -2592), torch.full((micro_batch,), L)
    )
    params = list(head.parameters())
    if optimizer_name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    elif optimizer_name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        opt = torch.optim.SGD(params, lr=1e-5)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    t, noise = draw_noise(micro_batch, 1, 64, torch.Generator().manual_seed(0))
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        loss = head(prefix, torch.randn(micro_batch, 64, 2, device=device), t, noise)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    plan = memory_plan(
        REAL, L, micro_batch, "all", "adamw8bit" if optimizer_name == "adamw8bit" else "adamw", checkpointing
    )
    out = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "micro_batch": micro_batch,
        "checkpointing": checkpointing,
        "optimizer": optimizer_name,
        "step_s": round(seconds, 1),
        "plan_gib": round(plan.total / GIB, 2),
        "plan_without_optimizer_gib": round(
            (plan.weights + plan.grads + plan.kv_batch + plan.activations) / GIB, 2
        ),
    }
    if device.startswith("cuda"):
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    else:
        out["peak_rss_gib"] = round(rss_gib(), 2)
        out["rss_before_model_gib"] = round(base_rss, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--checkpointing", default="on")
    parser.add_argument("--optimizer", default="sgd")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(one(args.micro_batch, args.checkpointing == "on", args.optimizer, device)))
        return
    if device == "cuda":
        configs = [(b, c, o) for o in ("adamw8bit", "adamw") for c in ("on", "off") for b in (1, 4)]
    else:
        configs = [(1, "on", "sgd"), (1, "off", "sgd")]
    for b, c, o in configs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--micro-batch",
            str(b),
            "--checkpointing",
            c,
            "--optimizer",
            o,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = (
            proc.stdout.strip().splitlines()[-1]
            if proc.returncode == 0
            else f"failed: {proc.stderr.strip()[-300:]}"
        )
        print(f"micro-batch {b}, checkpointing {c}, {o}: {line}", flush=True)


if __name__ == "__main__":
    main()
