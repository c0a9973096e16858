"""Training checkpoints: the released-format head export plus everything needed to resume exactly.

``runs/<name>/checkpoints/step-000040/``
- ``head.safetensors``: trained keys only, under the released names (``expert.*``, ``action_in_proj.*``,
  ``action_out_proj.*``); LoRA adapters are merged into the expert weights. Metadata: model config,
  starting weights (``base``), scope, step.
- ``trainer_state.pt``: trainable tensors as trained (adapters unmerged), optimizer, scheduler, data
  position (epoch, batch) and RNG states.
``checkpoints/latest`` names the newest complete checkpoint (written last, atomically).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.model.expert import TrajectoryHead
from alpamayo_cache.model.weights import save_head

GROUPS_BY_SCOPE = {
    "all": ("expert", "action_in_proj", "action_out_proj"),
    "heads": ("action_in_proj", "action_out_proj"),
    "lora": ("expert", "action_in_proj", "action_out_proj"),
}


@dataclass
class TrainState:
    seed: int = 0
    rank: int = 0
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    noise_generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        # Each rank draws its own noise stream; rank 0 of any run draws the single-process stream.
        self.noise_generator.manual_seed(self.seed + 1_000_003 * self.rank)


def export_head(head: TrajectoryHead, path: Path, scope: str, base: str, cfg: ModelConfig, step: int) -> None:
    """Write the released-format head file; LoRA adapters are merged for the export only."""
    lora_layers = [m for m in head.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    for m in lora_layers:
        m.merge()
    try:
        state = {}
        for key, value in head.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
        proxy = _StateProxy(state)
        meta = {"model_config": cfg.to_dict(), "base": base, "scope": scope, "step": step}
        save_head(path, proxy, only_groups=GROUPS_BY_SCOPE[scope], meta=meta)
    finally:
        for m in lora_layers:
            m.unmerge()


class _StateProxy(torch.nn.Module):
    """Lets save_head take an already-renamed state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self._state


def save_checkpoint(
    run_dir: Path,
    head,
    optimizer,
    scheduler,
    state: TrainState,
    scope: str,
    base: str,
    cfg: ModelConfig,
    generators: list[torch.Tensor] | None = None,
) -> Path:
    """``generators``: every rank's noise-generator state (index = rank); default: this process's."""
    folder = Path(run_dir) / "checkpoints" / f"step-{state.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    export_head(head, folder / "head.safetensors", scope, base, cfg, state.step)
    trainable = {n: p.detach().cpu().clone() for n, p in head.named_parameters() if p.requires_grad}
    payload = {
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "noise_generators": generators if generators is not None else [state.noise_generator.get_state()],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = folder / "trainer_state.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / "trainer_state.pt")
    latest = Path(run_dir) / "checkpoints" / "latest"
    tmp_latest = latest.with_suffix(".tmp")
    tmp_latest.write_text(folder.name)
    os.replace(tmp_latest, latest)  # only now is this checkpoint the one to resume from
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "trainer_state.pt").is_file() else None


def load_state(folder: Path, head, optimizer, scheduler, state: TrainState) -> None:
    payload = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    params = dict(head.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    state.step = payload["step"]
    state.epoch = payload["epoch"]
    state.batch_in_epoch = payload["batch_in_epoch"]
    generators = payload["noise_generators"]
    if state.rank >= len(generators):
        from alpamayo_cache.errors import UserError

        raise UserError(
            f"checkpoint {folder} was written by {len(generators)} rank(s); resume with the same number"
        )
    state.noise_generator.set_state(generators[state.rank])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
