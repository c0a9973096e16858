"""Reading committed samples back, refusing damaged data by name.

``StoreReader.read`` returns one sample: K/V as torch tensors in their *stored* precision (bf16, fp32,
fp8 e4m3 with its scales, int8/int4 codes with their (scale, zero) arrays: dequantisation happens on the
compute device, in the model) and the ground truth. Corrupt bytes fail the crc32c check; a missing chunk (zarr would return zeros) is
caught by counting initialised chunks. Either raises ``CorruptSample`` naming the sample.
The training hot loop reads whole batches through ``store.fast_read`` instead (same bytes).
The front-camera image (rewards) is read only when asked: ``read(sample_id, front=True)``.
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
from alpamayo_cache.store.quant import INT_BITS

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
    # Routed samples: the unguided prefix's K/V from info.route_start on, [l, h, S, d] (stored precision).
    uncond_keys: torch.Tensor | None = None
    uncond_values: torch.Tensor | None = None
    front_image: torch.Tensor | None = None  # uint8 [H, W, 3] when read with front=True and stored
    # int8/int4 stores: k_quant [l, 2, h, nk, d], v_quant [l, 2, h, L, nv] float16 (scale, zero); else None
    k_quant: torch.Tensor | None = None
    v_quant: torch.Tensor | None = None
    kv_dtype: str = ""
    kv_group: int = 0
    # --vlm-from-layer stores (read on request): hidden states entering layer k [L, D] (stored
    # precision), MRoPE position ids [3, L] int32, attention mask [L] (None when all ones).
    prompt_hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None


# CachedSample fields beyond K/V and truth (StoreReader.extras hands the same names out as a dict).
EXTRAS = ("uncond_keys", "uncond_values", "front_image", "prompt_hidden", "position_ids", "prompt_mask")


def kv_tensor(bits: np.ndarray, kv_dtype: str) -> torch.Tensor:
    """Stored bits -> torch tensor of the stored precision (a view, no conversion)."""
    t = torch.from_numpy(np.ascontiguousarray(bits))
    if kv_dtype == "bf16":
        return t.view(torch.int16).view(torch.bfloat16)
    if kv_dtype == "fp8":
        return t.view(torch.float8_e4m3fn)
    return t  # fp32, or int8/int4 codes as uint8


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

    @property
    def has_front_images(self) -> bool:
        """Whether every sample holds a front-camera image (stores made before issue 16 do not)."""
        return self.info.front_image_hw is not None

    def kv_names(self) -> list[str]:
        """The K/V arrays of this store's dtype (kv, plus fp8 scales or int8/int4 scale arrays)."""
        if self.info.kv_dtype == "fp8":
            return [F.KV, F.KV_SCALE]
        if self.info.kv_dtype in INT_BITS:
            return [F.KV, F.K_QUANT, F.V_QUANT]
        return [F.KV]

    def extra_names(self, info: F.SampleInfo, front: bool = False, prompt: bool | None = None) -> list[str]:
        """The arrays beside K/V and truth: a routed sample's unguided suffix (always: a few dozen
        tokens); with ``front``, the front-camera image; with ``prompt`` (default: when the store has
        them), the arrays that recompute the VLM layers above ``--vlm-from-layer``."""
        names = [F.KV_UNCOND] if info.route_start >= 0 else []
        if front and self.has_front_images:
            names.append(F.FRONT_IMAGE)
        prompt = self.info.vlm_from_layer is not None if prompt is None else prompt
        if prompt:
            if self.info.vlm_from_layer is None:
                raise UserError(
                    f"store {self.root} has no prompt hidden states (made without --vlm-from-layer)"
                )
            names += [F.PROMPT_HIDDEN, F.POSITION_IDS]
            if (self.sample_dir(info.sample_id) / F.PROMPT_MASK).is_dir():
                names.append(F.PROMPT_MASK)
        return names

    def extras(self, sample_id: str, front: bool = False) -> dict[str, torch.Tensor | None]:
        """``read``'s fields beyond K/V and truth (unguided suffix, front image, prompt states) of one
        sample (the fast batch path reads K/V itself)."""
        info = self.sample_info(sample_id)
        return self._extras(sample_id, info, self.arrays(sample_id, self.extra_names(info, front)))

    def _extras(self, sample_id: str, info: F.SampleInfo, arrays: dict) -> dict[str, torch.Tensor | None]:
        uncond = kv_tensor(arrays[F.KV_UNCOND], self.info.kv_dtype) if F.KV_UNCOND in arrays else None
        if uncond is not None and info.route_start + uncond.shape[3] != info.uncond_length:
            raise CorruptSample(
                f"sample {sample_id}: kv_uncond holds {uncond.shape[3]} tokens after {info.route_start}, "
                f"metadata says {info.uncond_length} in all"
            )

        def t(name: str) -> torch.Tensor | None:
            return torch.from_numpy(arrays[name]) if name in arrays else None

        hidden = arrays.get(F.PROMPT_HIDDEN)
        return {
            "uncond_keys": None if uncond is None else uncond[:, 0],
            "uncond_values": None if uncond is None else uncond[:, 1],
            "front_image": t(F.FRONT_IMAGE),
            "prompt_hidden": None
            if hidden is None
            else kv_tensor(hidden, "fp32" if hidden.itemsize == 4 else "bf16"),
            "position_ids": t(F.POSITION_IDS),
            "prompt_mask": t(F.PROMPT_MASK),
        }

    def read(self, sample_id: str, front: bool = False, prompt: bool | None = None) -> CachedSample:
        """One sample; ``front`` adds its front-camera image (None if the store has none); ``prompt``
        (default: when the store has them) the arrays that recompute the layers above --vlm-from-layer."""
        info = self.sample_info(sample_id)
        names = [*self.kv_names(), F.HIDDEN, *F.TRUTH_ARRAYS, *self.extra_names(info, front, prompt)]
        arrays = self.arrays(sample_id, names)
        kv = kv_tensor(arrays[F.KV], self.info.kv_dtype)
        if kv.shape[3] != info.length:
            raise CorruptSample(
                f"sample {sample_id}: kv holds {kv.shape[3]} tokens, metadata says L={info.length}"
            )
        head_dim = int(arrays[F.K_QUANT].shape[-1]) if F.K_QUANT in arrays else 0
        expected = F.kv_array_shapes(
            kv.shape[0], kv.shape[2], head_dim, info.length, self.info.kv_dtype, self.info.kv_group
        )
        for name in (F.K_QUANT, F.V_QUANT):
            if name in arrays and tuple(arrays[name].shape) != expected[name]:
                raise CorruptSample(
                    f"sample {sample_id}: {name} is {list(arrays[name].shape)}, expected {list(expected[name])} "
                    f"for L={info.length}; run `alpamayo-cache repair {self.root}`"
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
            k_quant=t(F.K_QUANT) if F.K_QUANT in arrays else None,
            v_quant=t(F.V_QUANT) if F.V_QUANT in arrays else None,
            kv_dtype=self.info.kv_dtype,
            kv_group=self.info.kv_group,
            **self._extras(sample_id, info, arrays),
        )

    def thumbnails(self, sample_id: str) -> np.ndarray:
        return self.arrays(sample_id, [F.THUMBS])[F.THUMBS]

    def front_image(self, sample_id: str) -> np.ndarray | None:
        """The sample's front-camera image, uint8 [H, W, 3] (None if the store has none)."""
        if not self.has_front_images:
            return None
        return self.arrays(sample_id, [F.FRONT_IMAGE])[F.FRONT_IMAGE]
