"""Experiment tracking through accelerate's trackers (TensorBoard by default), next to metrics.jsonl.

Every metrics.jsonl record is logged with the same keys and values at its step, so a TensorBoard (or
wandb, mlflow, ...) view shows exactly the numbers of the file. Logs go under ``<run>/tracking/``;
``train --set trackers=`` (an empty list) turns tracking off. A resumed run purges the events after its
checkpoint's step, as metrics.jsonl drops those lines, so the curves never show a step twice.
"""

from __future__ import annotations

from pathlib import Path

from alpamayo_cache.errors import UserError
from alpamayo_cache.options import to_jsonable

PROJECT = "alpamayo-cache"  # the tracker's project name: TensorBoard writes <run>/tracking/alpamayo-cache/
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml"}


def accelerator_kwargs(trackers: tuple[str, ...], run_dir: Path) -> dict:
    """``Accelerator(**...)`` arguments for these trackers; refuses one whose package is missing (accelerate
    would silently skip it)."""
    if not trackers:
        return {}
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in trackers:
        if name not in available:
            package = PACKAGES.get(name, name)
            raise UserError(
                f"tracker {name} is not installed: pip install {package}, or turn tracking off with --set trackers="
            )
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tracking"))
    return {"log_with": list(trackers), "project_config": project}


def start(accelerator, cfg, step: int) -> None:
    """Open the trackers (main process only); ``step``: the step the run starts from (0 or the resumed one)."""
    if not accelerator.log_with:
        return
    config = {
        k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in to_jsonable(cfg).items()
    }
    # Hyperparameters only on a fresh run; a resumed one purges what was logged after its checkpoint.
    init = {"tensorboard": {"purge_step": step + 1}} if step else {}
    accelerator.init_trackers(PROJECT, config=None if step else config, init_kwargs=init)


def log(accelerator, record: dict) -> None:
    """One metrics.jsonl record: every numeric value under its own key, at the record's step."""
    if accelerator.log_with:
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        accelerator.log(values, step=int(record["step"]))
