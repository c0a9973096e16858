"""Reading committed samples back, refusing damaged data by name.

``StoreReader.read`` returns the cached prefix (K/V as torch tensors in their stored precision) and the
ground truth. Corrupt bytes fail the crc32c codec; a missing chunk (zarr would return zeros) is caught
by counting initialised chunks. Either raises ``CorruptSample`` naming the sample.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.errors import UserError
from alpamayo_cache.store import layout as L
from alpamayo_cache.store.writer import open_root


class CorruptSample(UserError):
    pass


@dataclass
class CachedSample:
    info: L.SampleInfo
    keys: torch.Tensor  # [l, h, L, d]
    values: torch.Tensor  # [l, h, L, d]
    hidden: torch.Tensor  # [D]
    hist_xyz: torch.Tensor
    hist_rot: torch.Tensor
    fut_xyz: torch.Tensor
    fut_rot: torch.Tensor
    action: torch.Tensor  # [w, 2] normalised (accel, curvature) target


def decode_kv(raw: np.ndarray, kv_dtype: str, scale: np.ndarray | None) -> torch.Tensor:
    """Stored bits [l, 2, h, L, d] -> torch tensor (bf16, fp32, or fp8 dequantised to fp32)."""
    if kv_dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
    if kv_dtype == "fp32":
        return torch.from_numpy(np.ascontiguousarray(raw))
    if kv_dtype == "fp8":
        q = torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float8_e4m3fn).float()
        return q * torch.from_numpy(scale).float()[:, :, None, None, None]
    raise CorruptSample(f"unknown kv dtype {kv_dtype!r}")


def encode_kv(kv: torch.Tensor, kv_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """torch [l, 2, h, L, d] -> (bits for disk, per-layer scale for fp8 or None)."""
    if kv_dtype == "bf16":
        return kv.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), None
    if kv_dtype == "fp32":
        return kv.float().contiguous().numpy(), None
    if kv_dtype == "fp8":
        x = kv.float()
        # Per (layer, K|V) scale so the largest magnitude maps to e4m3's max (448).
        amax = x.abs().amax(dim=(2, 3, 4)).clamp_min(1e-12)
        scale = amax / 448.0
        q = (x / scale[:, :, None, None, None]).to(torch.float8_e4m3fn)
        return q.contiguous().view(torch.uint8).numpy(), scale.numpy().astype(np.float32)
    raise UserError(f"--kv-dtype must be one of {L.KV_DTYPES}")


class StoreReader:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise UserError(f"store {self.root} does not exist: run `alpamayo-cache precompute` first")
        self.info = open_root(self.root)
        self._infos: dict[str, L.SampleInfo] | None = None

    def sample_infos(self) -> dict[str, L.SampleInfo]:
        if self._infos is None:
            import zarr

            infos = {}
            for path in sorted((self.root / L.SAMPLES_DIR).iterdir()):
                if not path.is_dir():
                    continue
                try:
                    group = zarr.open_group(str(path), mode="r")
                    infos[path.name] = L.SampleInfo.from_dict(group.attrs["sample"])
                except Exception as exc:
                    raise CorruptSample(
                        f"sample {path.name} in {self.root} has unreadable metadata ({exc}); run verify"
                    ) from exc
            self._infos = infos
        return self._infos

    def select(self, split: str | None = None, camera_sets: list[str] | None = None) -> list[str]:
        return [
            sid
            for sid, info in self.sample_infos().items()
            if (split in (None, "all") or info.split == split)
            and (not camera_sets or info.camera_set in camera_sets)
        ]

    def _arrays(self, sample_id: str, names: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
        """(sample attrs, arrays) of one sample, fetched concurrently in one trip into zarr's loop
        (about half the per-sample overhead of one synchronous call per array)."""
        import zarr.api.asynchronous as za
        from zarr.core.sync import sync

        path = self.root / L.SAMPLES_DIR / sample_id
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
                        "run `alpamayo-cache verify` and re-run precompute for it"
                    )
            values = await asyncio.gather(*(a.getitem(...) for a in arrays))
            return dict(group.attrs), dict(zip(names, values, strict=True))

        try:
            return sync(fetch())
        except CorruptSample:
            raise
        except KeyError as exc:
            raise CorruptSample(
                f"sample {sample_id}: array {exc} is missing; run `alpamayo-cache verify`"
            ) from None
        except Exception as exc:
            raise CorruptSample(
                f"sample {sample_id} is corrupt on disk ({type(exc).__name__}: {str(exc)[:60]}); run `alpamayo-cache verify`"
            ) from exc

    def read(self, sample_id: str) -> CachedSample:
        names = [L.KV, L.HIDDEN, L.HIST_XYZ, L.HIST_ROT, L.FUT_XYZ, L.FUT_ROT, L.ACTION]
        if self.info.kv_dtype == "fp8":
            names.append(L.KV_SCALE)
        attrs, arrays = self._arrays(sample_id, names)
        info = L.SampleInfo.from_dict(attrs["sample"])
        kv = decode_kv(arrays[L.KV], self.info.kv_dtype, arrays.get(L.KV_SCALE))
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
            hidden=t(L.HIDDEN),
            hist_xyz=t(L.HIST_XYZ),
            hist_rot=t(L.HIST_ROT),
            fut_xyz=t(L.FUT_XYZ),
            fut_rot=t(L.FUT_ROT),
            action=t(L.ACTION),
        )

    def thumbnails(self, sample_id: str) -> np.ndarray:
        return self._arrays(sample_id, [L.THUMBS])[1][L.THUMBS]
