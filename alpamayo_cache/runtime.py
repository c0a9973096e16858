"""Process-level helpers: logging, device/dtype choice, distributed rank, progress bars, versions."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("alpamayo_cache")


def init_logging(level: int = logging.INFO) -> None:
    if log.handlers:
        return
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def human_bytes(n: float) -> str:
    """Bytes with a unit a person reads at a glance: 512 B, 3.4 KB, 441 MB, 1.2 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def dist_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            from alpamayo_cache.errors import UserError

            raise UserError(f"--device {device} requested but CUDA is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def compute_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and not what the tests pin)."""
    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[requested]


def autocast(device: str, dtype: torch.dtype):
    """bf16 autocast on CUDA; a disabled context on CPU (fp32 there)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def versions(device: str) -> dict[str, str]:
    import transformers
    import zarr

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def progress(
    items: Iterable[T],
    total: int,
    description: str,
    unit: str = "samples",
    status: dict[str, str] | None = None,
) -> Iterator[T]:
    """A rich progress bar with rate and ETA. ``status`` (mutable) is shown after the rate, e.g. the loss."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="", status="")
        for item in items:
            yield item
            done = bar.tasks[0].completed + 1
            elapsed = bar.tasks[0].elapsed or 1e-9
            text = " ".join(f"{k} {v}" for k, v in (status or {}).items())
            bar.update(task, advance=1, rate=f"{done / elapsed:.2f} {unit}/s", status=text)
