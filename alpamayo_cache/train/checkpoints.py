"""The run folder's whole lifecycle: create, lock, save, verify, resume, retain, export.

``runs/<name>/``
- ``.alpamayo-cache-run``: marks a folder this program made (``--overwrite`` deletes nothing else).
- ``run.lock``: held (fcntl) by the process training into the folder, or evaluating into it; the
  kernel releases it when that process dies, so a stale lock is taken over silently.
- ``config.json``: the resolved settings, model config and starting weights; ``config_history.jsonl``
  lists settings changed by ``--resume-with-changes``.
- ``metrics.jsonl``: one JSON line per step.
- ``checkpoints/step-000040/``: ``head.safetensors`` (trained keys under the released names, LoRA
  merged), ``trainer_state.pt`` (trainable tensors as trained, optimizer, schedule, data position, RNG),
  ``meta.json`` (step, validation loss), ``vlm_layers.safetensors`` (``--train vlm-top``: the VLM's
  layers k.. under their release names, LoRA merged) and ``checksums.json`` (written last: a checkpoint without a
  matching table is incomplete or damaged). ``checkpoints/latest`` names the newest complete one.
Retention keeps the newest ``keep`` checkpoints plus the best by validation loss.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.integrity import folder_problems, write_checksums
from alpamayo_cache.options import to_jsonable
from alpamayo_cache.runtime import log

MARKER = ".alpamayo-cache-run"
LOCK = "run.lock"
HEAD = "head.safetensors"
STATE = "trainer_state.pt"
META = "meta.json"
# Settings a resume may change freely: they do not change what is computed.
RESUME_FREE = {
    "resume", "resume_with_changes", "overwrite", "stop_after", "dry_run", "num_workers", "prefetch", "save_every",
    "keep_checkpoints", "val_every", "device", "gpu_memory_gb", "run", "run_dir", "trackers",
}  # fmt: skip


class RunLock:
    """Exclusive lock on a run folder, held until ``release`` (or process death)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / LOCK
        self.handle: IO[str] | None = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise UserError(
                f"{folder} is in use by {holder}: wait for it to finish, or use another run folder"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{what} (pid {os.getpid()})")
        self.handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _check_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file: pass another --run or --run-dir")


def open_run(run_dir: Path, cfg: TrainConfig) -> tuple[RunLock, Path | None]:
    """Create, take over (``--overwrite``) or reopen (``--resume``) a run folder and lock it.
    Returns the lock and the checkpoint to resume from (None for a fresh run)."""
    run_dir = Path(run_dir)
    _check_folder(run_dir)
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if cfg.resume:
        if not is_run_folder(run_dir):
            raise UserError(f"--resume: {run_dir} is not a run folder of alpamayo-cache (nothing to resume)")
        lock = RunLock(run_dir, "train")
        ckpt = latest_intact(run_dir)
        if ckpt is None:
            lock.release()
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        return lock, ckpt
    if existing and not cfg.overwrite:
        raise UserError(
            f"run folder {run_dir} already exists: pass --resume to continue it or --overwrite to start over"
        )
    if existing and not is_run_folder(run_dir):
        raise UserError(
            f"--overwrite: {run_dir} was not made by alpamayo-cache (no {MARKER}); nothing was deleted: "
            "choose another --run or --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, "train")
    for entry in run_dir.iterdir():  # --overwrite: our own run folder, emptied under our lock
        if entry.name in (LOCK, MARKER):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (run_dir / MARKER).write_text(json.dumps({"made_by": "alpamayo-cache"}))
    return lock, None


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder this program made that holds no checkpoint (a run that failed early)."""
    if is_run_folder(run_dir) and not _steps(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def write_config(run_dir: Path, cfg: TrainConfig, model_cfg: Any, init: str, described: str) -> None:
    payload = {
        "train": to_jsonable(cfg),
        "model": model_cfg.to_dict(),
        "init": init,
        "init_described": described,
    }
    (Path(run_dir) / "config.json").write_text(json.dumps(payload, indent=2))


def check_resume_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's (listing them), unless allowed."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--resume: {path} is missing or damaged; cannot check the run's settings") from None
    now = to_jsonable(cfg)
    # A setting the run's config.json lacks (added to the program after the run started) is unchanged
    # when it still has its default: the run trained under that default.
    defaults = _default_settings(cfg)
    changed = {
        k: (saved.get(k, defaults[k]), v)
        for k, v in now.items()
        if k not in RESUME_FREE and saved.get(k, defaults[k]) != v
    }
    if not changed:
        return
    listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
    if not cfg.resume_with_changes:
        raise UserError(
            f"--resume with changed settings ({listing}): repeat the run's settings, or pass --resume-with-changes"
        )
    with open(Path(run_dir) / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"changed": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}}) + "\n")
    log.warning(f"resuming with changed settings: {listing} (recorded in config_history.jsonl)")


def _default_settings(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON with every field that has a default set to it (the store and the like kept)."""
    fields = [f for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING]
    return to_jsonable(dataclasses.replace(cfg, **{f.name: f.default for f in fields}))


def _steps(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; a damaged newer one is named."""
    for folder in reversed(_steps(run_dir)):
        problems = folder_problems(folder)
        if not problems:
            return folder
        log.warning(
            f"checkpoint {folder.name} is damaged or incomplete ({problems[0]}); trying the previous one"
        )
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint by the ``latest`` pointer (falling back to an intact older one)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        folder = pointer.parent / name
        if name.startswith("step-") and "/" not in name and not folder_problems(folder):
            return folder
    return latest_intact(run_dir)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def save(
    run_dir: Path,
    policy: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    export: Any,
    world: int,
    val_loss: float | None,
    keep: int,
) -> Path:
    """Write checkpoint ``step-<n>`` (head, trainer state, meta, then checksums) and apply retention.
    On a full disk the partial checkpoint is removed and the previous ones stay."""
    folder = Path(run_dir) / "checkpoints" / f"step-{state.step:06d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        extra = export(folder / HEAD) or []  # model files beside the head (co-trained VLM layers)
        payload = {
            "trainable": {
                n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad
            },
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "world_size": world,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(payload, folder / STATE)
        (folder / META).write_text(json.dumps({"step": state.step, "val_loss": val_loss}))
        write_checksums(folder, [HEAD, *extra, STATE, META])
        pointer = folder.parent / "latest"
        tmp = folder.parent / ".latest.tmp"
        tmp.write_text(folder.name)
        os.replace(tmp, pointer)  # only now is this checkpoint the one to resume from
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = latest_checkpoint(run_dir)
            raise UserError(
                f"disk full while saving checkpoint step {state.step}; kept {previous.name if previous else 'nothing'}: "
                "free space, then --resume"
            ) from None
        raise
    _retain(run_dir, keep)
    return folder


def _retain(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and the one with the lowest validation loss."""
    steps = _steps(run_dir)
    kept = set(steps[-keep:])
    scored = []
    for folder in steps:
        try:
            loss = json.loads((folder / META).read_text()).get("val_loss")
        except (OSError, ValueError):
            loss = None
        if isinstance(loss, int | float):
            scored.append((loss, folder))
    if scored:
        kept.add(min(scored)[1])
    for folder in steps:
        if folder not in kept:
            shutil.rmtree(folder)


def load(
    folder: Path, policy: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState, world: int
) -> None:
    try:
        payload = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged pickle raises many kinds of errors
        raise UserError(
            f"{folder / STATE} is unreadable ({type(exc).__name__}): resume from another checkpoint"
        ) from None
    if payload.get("world_size", 1) != world:
        raise UserError(
            f"checkpoint {folder} was written by {payload.get('world_size')} rank(s); resume with the same number"
        )
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    state.step, state.epoch, state.batch_in_epoch = (
        payload["step"],
        payload["epoch"],
        payload["batch_in_epoch"],
    )
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def resolve_checkpoint(spec: str) -> str:
    """A run folder means its newest intact checkpoint's head file; refuse what does not exist."""
    path = Path(spec)
    if path.is_dir() and (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"run folder {path} has no complete checkpoint yet")
        return str(ckpt / "head.safetensors")
    if path.is_dir() and (path / "head.safetensors").is_file():
        return str(path / "head.safetensors")
    if not path.exists():
        raise UserError(f"--checkpoint {spec} does not exist: pass a run folder (runs/<name>) or a head file")
    if path.is_file() and path.suffix == ".safetensors":
        return spec
    raise UserError(f"--checkpoint {spec} is neither a run folder nor a .safetensors head file")


def resume_command(cfg: TrainConfig, run_dir: Path) -> str:
    """The command that continues this run: its store and folder plus every setting that differs from
    its default, so the resume finds the run's own settings."""
    now = to_jsonable(cfg)
    defaults = _default_settings(cfg)
    sets = [
        f"--set {shlex.quote(f'{k}={json.dumps(v)}')}"
        for k, v in now.items()
        if k not in RESUME_FREE and k != "store" and v != defaults[k]
    ]
    words = ["alpamayo-cache train", shlex.quote(str(cfg.store)), "--run-dir", shlex.quote(str(run_dir))]
    return " ".join([*words, *sets, "--resume"])
