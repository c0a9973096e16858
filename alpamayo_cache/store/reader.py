"""Reading committed samples back, refusing damaged data by name.

``StoreReader.read`` returns one sample: K/V as torch tensors in their *stored* precision (bf16, fp32,
or fp8 e4m3 with its scales: dequantisation happens on the compute device, in the model) and the
ground truth. Corrupt bytes fail the crc32c check; a missing chunk (zarr would return zeros) is
caught by counting initialised chunks. Either raises ``CorruptSample`` naming the sample.
The training hot loop reads whole batches through ``store.fast_read`` instead (same bytes).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import format as F
from alpamayo_cache.store.format import CorruptSample

__all__ = ["CachedSample", "CorruptSample", "StoreReader", "kv_tensor"]


@dataclass
class CachedSample:
    info: F.SampleInfo
    keys: torch.Tensor  # [l, h, L, d] in the stored dtype
    values: torch.Tensor  # [l, h, L, d]
    kv_scale: torch.Tensor | None  # [l, 2] fp32 (fp8 stores), else None
    hidden: torch.Tensor  # [D]
    hist_xyz: torch.Tensor
    hist_rot: torch.Tensor
    fut_xyz: torch.Tensor
    fut_rot: torch.Tensor
    action: torch.Tensor  # [w, 2] normalised (accel, curvature) target
    # --vlm-from-layer stores (read on request): hidden states entering layer k [L, D] (stored
    # precision), MRoPE position ids [3, L] int32, attention mask [L] (None when all ones).
    prompt_hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None


def kv_tensor(bits: np.ndarray, kv_dtype: str) -> torch.Tensor:
    """Stored bits -> torch tensor of the stored precision (a view, no conversion)."""
    t = torch.from_numpy(np.ascontiguousarray(bits))
    if kv_dtype == "bf16":
        return t.view(torch.int16).view(torch.bfloat16)
    if kv_dtype == "fp8":
        return t.view(torch.float8_e4m3fn)
    return t


class StoreReader:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.info = F.read_info(self.root)
        self._infos: dict[str, F.SampleInfo] = {}

    def sample_dir(self, sample_id: str) -> Path:
        return self.root / F.SAMPLES_DIR / F.check_id(sample_id, "sample id")

    def sample_info(self, sample_id: str) -> F.SampleInfo:
        """One committed sample's attributes (read once, then cached)."""
        if sample_id not in self._infos:
            path = self.sample_dir(sample_id) / "zarr.json"
            if not path.parent.is_dir():
                raise UserError(f"sample {sample_id} is not committed in {self.root}")
            try:
                data = json.loads(path.read_text())["attributes"]["sample"]
                self._infos[sample_id] = F.SampleInfo.from_dict(data)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CorruptSample(
                    f"sample {sample_id} in {self.root} has unreadable metadata ({type(exc).__name__}): "
                    f"run `alpamayo-cache repair {self.root}`"
                ) from None
        return self._infos[sample_id]

    def sample_infos(self) -> dict[str, F.SampleInfo]:
        """Every committed sample's attributes; a damaged one is refused by name."""
        return {sid: self.sample_info(sid) for sid in F.committed_samples(self.root)}

    def select(self, split: str | None = None, camera_sets: list[str] | None = None) -> list[str]:
        return [
            sid
            for sid, info in self.sample_infos().items()
            if (split in (None, "all") or info.split == split)
            and (not camera_sets or info.camera_set in camera_sets)
        ]

    def arrays(self, sample_id: str, names: list[str]) -> dict[str, np.ndarray]:
        """Arrays of one sample, fetched concurrently in one trip into zarr's event loop."""
        import zarr.api.asynchronous as za
        from zarr.core.sync import sync

        path = self.sample_dir(sample_id)
        if not path.is_dir():
            raise UserError(f"sample {sample_id} is not committed in {self.root}")

        async def fetch():
            group = await za.open_group(store=str(path), mode="r")
            arrays = await asyncio.gather(*(group.getitem(n) for n in names))
            initialised = await asyncio.gather(*(a.nchunks_initialized() for a in arrays))
            for name, arr, n in zip(names, arrays, initialised, strict=True):
                if n != arr.nchunks:  # zarr would silently return zeros for the missing chunks
                    raise CorruptSample(
                        f"sample {sample_id}: {name} has {arr.nchunks - n} missing chunk(s) on disk; "
                        f"run `alpamayo-cache repair {self.root}` and re-run precompute"
                    )
            values = await asyncio.gather(*(a.getitem(...) for a in arrays))
            return dict(zip(names, values, strict=True))

        try:
            return sync(fetch())
        except CorruptSample:
            raise
        except KeyError as exc:
            raise CorruptSample(
                f"sample {sample_id}: array {exc} is missing; run `alpamayo-cache repair {self.root}`"
            ) from None
        except Exception as exc:
            raise CorruptSample(
                f"sample {sample_id} is corrupt on disk ({type(exc).__name__}: {str(exc)[:60]}); "
                f"run `alpamayo-cache repair {self.root}` and re-run precompute"
            ) from exc

    def read(self, sample_id: str, prompt: bool | None = None) -> CachedSample:
        """One sample; ``prompt`` (default: when the store has them) adds the arrays that recompute
        the VLM layers above ``--vlm-from-layer``."""
        names = [F.KV, F.HIDDEN, *F.TRUTH_ARRAYS]
        if self.info.kv_dtype == "fp8":
            names.append(F.KV_SCALE)
        prompt = self.info.vlm_from_layer is not None if prompt is None else prompt
        if prompt:
            if self.info.vlm_from_layer is None:
                raise UserError(
                    f"store {self.root} has no prompt hidden states (made without --vlm-from-layer)"
                )
            names += [F.PROMPT_HIDDEN, F.POSITION_IDS]
            if (self.sample_dir(sample_id) / F.PROMPT_MASK).is_dir():
                names.append(F.PROMPT_MASK)
        arrays = self.arrays(sample_id, names)
        info = self.sample_info(sample_id)
        kv = kv_tensor(arrays[F.KV], self.info.kv_dtype)
        if kv.shape[3] != info.length:
            raise CorruptSample(
                f"sample {sample_id}: kv holds {kv.shape[3]} tokens, metadata says L={info.length}"
            )

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(arrays[name])

        return CachedSample(
            info=info,
            keys=kv[:, 0],
            values=kv[:, 1],
            kv_scale=t(F.KV_SCALE) if F.KV_SCALE in arrays else None,
            hidden=t(F.HIDDEN),
            hist_xyz=t(F.HIST_XYZ),
            hist_rot=t(F.HIST_ROT),
            fut_xyz=t(F.FUT_XYZ),
            fut_rot=t(F.FUT_ROT),
            action=t(F.ACTION),
            prompt_hidden=(
                kv_tensor(
                    arrays[F.PROMPT_HIDDEN], "fp32" if arrays[F.PROMPT_HIDDEN].itemsize == 4 else "bf16"
                )
                if prompt
                else None
            ),
            position_ids=t(F.POSITION_IDS) if prompt else None,
            prompt_mask=t(F.PROMPT_MASK) if F.PROMPT_MASK in arrays else None,
        )

    def thumbnails(self, sample_id: str) -> np.ndarray:
        return self.arrays(sample_id, [F.THUMBS])[F.THUMBS]
