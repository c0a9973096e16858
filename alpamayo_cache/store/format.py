"""The feature store's format: a versioned product that readers check before trusting.

```
<store>/
  zarr.json                    root group; attributes["alpamayo_cache"] = StoreInfo (versions, fingerprint)
  samples/<sample_id>/         one committed sample = one zarr group (present here = committed)
    kv        [l, 2, h, L, w]  keys (0) and values (1) per VLM layer, one chunk per layer:
                               bf16 bits as uint16 | fp32 | fp8 e4m3 bytes as uint8 | int8 codes as uint8
                               | int4 codes packed two per byte (w = d/2; w = d otherwise)
    kv_scale  [l, 2]           fp8 only: per-layer, per K|V dequantisation scale
    kv_uncond [l, 2, h, S, d]  routed samples only: K/V of the prompt WITHOUT its route from the first
                               token that differs (route_start) on; the tokens before it are bit-identical
                               to kv's and are not stored twice (fp8: encoded with kv's scales)
    k_quant   [l, 2, h, nk, d] int8/int4 only: float16 (scale, zero) per key channel and token group
    v_quant   [l, 2, h, L, nv] int8/int4 only: float16 (scale, zero) per value token and channel group
                               (store/quant.py: nk = 1 and nv = 1 for int8, groups of StoreInfo.kv_group for int4)
    hidden    [D]              VLM last hidden state (after the final norm) at <|traj_future_start|>
    hist_xyz [16,3] hist_rot [16,3,3] fut_xyz [64,3] fut_rot [64,3,3] action [64,2]   float32, ego frame
    thumbs    [c, 48, 80, 3]   uint8 camera thumbnails (last frame of each camera) for plots
    front_image [180, 320, 3]  uint8 front-wide camera at t0 (rewards' visual safety); its camera record
                               (data/camera_model.CameraView.to_dict, or None) is the attr front_camera
  (stores made with --vlm-from-layer k: kv holds layers 0..k-1 only, and three more arrays let
   training recompute layers k..N-1, see model/vlm_top.py)
    prompt_hidden [L, D]       hidden states entering text layer k: bf16 bits as uint16 | fp32 (fp32 stores)
    position_ids  [3, L]       int32 MRoPE position ids of the prompt (temporal, height, width)
    prompt_mask   [L]          uint8 attention mask, only when it is not all ones
  staging/rank-<r>/<id>/       samples being written; renamed into samples/ when complete
  quarantine/<id>/             damaged samples moved aside by `repair` (re-made by the next precompute)
  failures/rank-<r>.jsonl      clips/samples that could not be made, with the reason
  locks/rank-<r>.lock          held by the writer of that rank
```
Every array carries a crc32c codec (codec chain [bytes little-endian, crc32c], no compression), so
flipped or truncated bytes raise on read instead of returning wrong numbers; a missing chunk (which
zarr would fill with zeros) is caught too. Sample and clip ids are data, never paths: they are checked
against ``SAFE_ID`` before any path is built from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from alpamayo_cache.configs import KV_DTYPES
from alpamayo_cache.errors import UserError
from alpamayo_cache.store import quant as Q

# v2: inputs bit-exact with the release's inference path (history tokens, ego frame, pixels).
LAYOUT_VERSION = 2
STORE_ATTR = "alpamayo_cache"
SAMPLES_DIR = "samples"
STAGING_DIR = "staging"
QUARANTINE_DIR = "quarantine"
FAILURES_DIR = "failures"
LOCKS_DIR = "locks"
ROOT_ENTRIES = {"zarr.json", SAMPLES_DIR, STAGING_DIR, QUARANTINE_DIR, FAILURES_DIR, LOCKS_DIR}

KV = "kv"
KV_SCALE = "kv_scale"
KV_UNCOND = "kv_uncond"
K_QUANT = "k_quant"
V_QUANT = "v_quant"
HIDDEN = "hidden"
HIST_XYZ = "hist_xyz"
HIST_ROT = "hist_rot"
FUT_XYZ = "fut_xyz"
FUT_ROT = "fut_rot"
ACTION = "action"
THUMBS = "thumbs"
PROMPT_HIDDEN = "prompt_hidden"
POSITION_IDS = "position_ids"
PROMPT_MASK = "prompt_mask"
THUMB_SIZE = (48, 80)
# The front-wide camera's last frame (the one the prompt shows at t0), resized from the decoded native
# frame for the rewards of reward-weighted fine-tuning (issue 16): enough pixels for a corridor's texture
# and colour, 173 KB per sample (0.04% of a real-size bf16 sample). Read only when asked (awr, eval).
FRONT_IMAGE = "front_image"
FRONT_IMAGE_SIZE = (180, 320)
TRUTH_ARRAYS = (HIST_XYZ, HIST_ROT, FUT_XYZ, FUT_ROT, ACTION)
KV_ITEMSIZE = {"bf16": 2, "fp32": 4, "fp8": 1, "int8": 1, "int4": 1}  # bytes per stored element

# Ids become folder names: letters, digits, '.', '_', '-', at most 200 characters, never '.' or '..'.
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


class CorruptSample(UserError):
    """A committed sample whose bytes or metadata are damaged; the message names the sample."""


def check_id(value: str, kind: str = "clip id") -> str:
    if not isinstance(value, str) or not SAFE_ID.match(value) or ".." in value:
        raise UserError(
            f"{kind} {value!r} is not a safe name (letters, digits, '.', '_', '-'; at most 200 characters)"
        )
    return value


def inside(root: Path, path: Path) -> Path:
    """``path`` if it lies inside ``root`` (after resolving links), else refuse: nothing is written or
    deleted outside the folder the user named."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise UserError(f"refusing to touch {path}: it lies outside {root}")
    return Path(path)


@dataclass(frozen=True)
class StoreInfo:
    """What produced the store. The fingerprint covers everything that changes the features."""

    layout_version: int
    model_name: str
    model_identity: str  # hash of the VLM weights' identity (files, sizes) or "preset:<name>:seed"
    model_config: dict[str, Any]
    prompt_mode: str
    kv_dtype: str
    compute_dtype: str
    attn_implementation: str
    fingerprint: str = ""
    created_by: dict[str, str] = field(default_factory=dict)
    front_image_hw: list[int] | None = None  # [H, W] of every sample's front_image; None: not stored

    # What else shaped the features: the routes' digest (None: no routes). Empty for R1 stores.
    inputs: dict[str, Any] = field(default_factory=dict)
    kv_group: int = 0  # int4: tokens per K group = channels per V group (store/quant.py); else 0
    # k of --vlm-from-layer: K/V of layers < k stored, layers >= k recomputed from prompt_hidden.
    vlm_from_layer: int | None = None

    @staticmethod
    def compute_fingerprint(
        model_identity: str,
        model_config: dict,
        prompt_mode: str,
        kv_dtype: str,
        compute_dtype: str,
        inputs: dict[str, Any] | None = None,
        kv_group: int = 0,
        vlm_from_layer: int | None = None,
    ) -> str:
        """The model config carries the prompt layout (release, camera/frame labels, history tokens,
        route format), so stores of different releases never share a fingerprint; ``inputs`` adds what
        else the features depend on (e.g. the routes) and ``kv_group`` the int4 grouping and
        ``vlm_from_layer`` the --vlm-from-layer k; each is left out when empty so other stores'
        fingerprints stay as they were."""
        payload: dict[str, Any] = {
            "layout": LAYOUT_VERSION,
            "model": model_identity,
            "config": model_config,
            "prompt": prompt_mode,
            "kv_dtype": kv_dtype,
            "compute_dtype": compute_dtype,
            "front_image": list(FRONT_IMAGE_SIZE),  # what precompute stores for the rewards
        }
        if inputs:
            payload["inputs"] = inputs
        if kv_group:
            payload["kv_group"] = kv_group
        if vlm_from_layer is not None:
            payload["vlm_from_layer"] = vlm_from_layer
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def stored_layers(self) -> int:
        """VLM layers whose K/V the store holds (all of them, or the k below --vlm-from-layer)."""
        if self.vlm_from_layer is not None:
            return self.vlm_from_layer
        return int(self.model_config["text"]["num_layers"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SampleInfo:
    """Per-sample attributes (stored in the sample group's zarr.json)."""

    sample_id: str
    clip_id: str
    t0_us: int
    camera_set: str
    cameras: list[str]
    split: str
    length: int  # L: prefix tokens, up to and including <|traj_future_start|>
    rope_delta: int
    reasoning: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    # Navigation route (1.5 / 2 Super): the text the prompt carried, and whether it had one. A routed
    # sample also stores its unguided prefix: the first route_start tokens of kv, then kv_uncond.
    has_route: bool = False
    route: str = ""
    route_start: int = -1
    uncond_length: int = 0
    uncond_rope_delta: int = 0
    front_camera: dict[str, Any] | None = None  # CameraView record of front_image; None: no calibration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- the root ------------------------------------------------------------------------------------------


def read_info(root: Path) -> StoreInfo:
    """The root's StoreInfo, refusing anything that is not a readable store of this version."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"store {root} does not exist: run `alpamayo-cache precompute` first")
    if not root.is_dir():
        raise UserError(f"store {root} is a file, not a store folder: pass the store's folder")
    marker = root / "zarr.json"
    if not marker.is_file():
        raise UserError(
            f"{root} is not an alpamayo-cache store (no zarr.json): run `alpamayo-cache precompute`"
        )
    try:
        attrs = json.loads(marker.read_text()).get("attributes", {})
        data = attrs[STORE_ATTR]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(
            f"{marker} is unreadable (truncated or damaged): restore it from a copy, or re-run precompute "
            "into a new --store"
        ) from None
    except KeyError:
        raise UserError(f"{root} is a zarr group but not an alpamayo-cache store") from None
    version = data.get("layout_version") if isinstance(data, dict) else None
    if version != LAYOUT_VERSION:
        older = isinstance(version, int) and version < LAYOUT_VERSION
        why = (
            "an older alpamayo-cache whose inputs were not bit-exact with the release"
            if older
            else "another version"
        )
        raise UserError(
            f"store {root} has layout v{version}, made by {why}; this alpamayo-cache reads v{LAYOUT_VERSION}: "
            "re-run precompute into a new --store path"
        )
    try:
        return StoreInfo.from_dict(data)
    except TypeError:
        raise UserError(
            f"{marker}: store metadata is incomplete; re-run precompute into a new --store"
        ) from None


def write_info(root: Path, info: StoreInfo) -> None:
    """Write the root group's zarr.json atomically (a temporary file renamed into place)."""
    payload = {"zarr_format": 3, "node_type": "group", "attributes": {STORE_ATTR: info.to_dict()}}
    marker = Path(root) / "zarr.json"
    tmp = marker.with_name(f".zarr.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, marker)


def committed_samples(root: Path) -> list[str]:
    """Ids of every committed sample (the samples/ listing is the index), sorted."""
    folder = Path(root) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and SAFE_ID.match(p.name))


# -- arrays --------------------------------------------------------------------------------------------


def create_array(group: Any, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
    """One array with the store's codec chain; every chunk is written, so a missing file means damage."""
    from zarr.codecs import Crc32cCodec

    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks or data.shape,
        compressors=[Crc32cCodec()],
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},
    )
    arr[...] = data


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Bytes of K/V codes per prefix token (int8/int4 scales come on top: ``sample_bytes``)."""
    if kv_dtype not in KV_ITEMSIZE:
        raise UserError(f"--kv-dtype must be one of {KV_DTYPES}")
    return num_layers * 2 * kv_heads * Q.code_width(head_dim, kv_dtype) * KV_ITEMSIZE[kv_dtype]


def kv_array_shapes(
    layers: int, kv_heads: int, head_dim: int, length: int, kv_dtype: str, group: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of the K/V arrays a sample of ``length`` tokens stores in ``kv_dtype``."""
    shapes = {KV: (layers, 2, kv_heads, length, Q.code_width(head_dim, kv_dtype))}
    if kv_dtype == "fp8":
        shapes[KV_SCALE] = (layers, 2)
    if kv_dtype in Q.INT_BITS:
        shapes[K_QUANT] = (layers, 2, kv_heads, Q.key_groups(length, group), head_dim)
        shapes[V_QUANT] = (layers, 2, kv_heads, length, Q.value_groups(head_dim, group))
    return shapes


def sample_bytes(
    length: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    kv_dtype: str,
    hidden: int,
    cameras: int,
    block: int = 4096,
    vlm_from_layer: int | None = None,
) -> int:
    """Disk one committed sample takes, as ``du`` counts it: every chunk file (payload + 4-byte crc)
    and metadata file rounded up to the filesystem's ``block``, plus one block per folder. With ``vlm_from_layer`` k: K/V of k layers plus the prompt's hidden
    states and position ids."""

    def on_disk(n: int) -> int:
        return -(-n // block) * block

    crc = 4
    if vlm_from_layer is not None:
        layers = vlm_from_layer
    arrays = [hidden * 4, 16 * 3 * 4, 16 * 9 * 4, 64 * 3 * 4, 64 * 9 * 4, 64 * 2 * 4]
    arrays.append(cameras * THUMB_SIZE[0] * THUMB_SIZE[1] * 3)
    shapes = kv_array_shapes(
        layers, kv_heads, head_dim, length, kv_dtype, Q.default_group(kv_dtype, head_dim)
    )
    kv_chunk = math.prod(shapes[KV][1:]) * KV_ITEMSIZE[kv_dtype] + crc  # one chunk file per layer
    arrays.append(FRONT_IMAGE_SIZE[0] * FRONT_IMAGE_SIZE[1] * 3)
    arrays += [math.prod(shapes[name]) * 4 for name in (KV_SCALE,) if name in shapes]  # float32
    arrays += [math.prod(shapes[name]) * 2 for name in (K_QUANT, V_QUANT) if name in shapes]  # float16
    if vlm_from_layer is not None:
        arrays += [length * hidden * prompt_hidden_itemsize(kv_dtype), 3 * length * 4]
    n_arrays = len(arrays) + 1  # + kv
    metadata = (n_arrays + 1) * on_disk(900)  # a zarr.json per array (~600 B) and the group's (~800 B)
    folders = (n_arrays + 1) * block
    return layers * on_disk(kv_chunk) + sum(on_disk(a + crc) for a in arrays) + metadata + folders


def encode_kv(kv: Any, kv_dtype: str, scale: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """torch [l, 2, h, L, d] -> (bits for disk, per-(layer, K|V) scale for fp8 or None). fp8 with a given
    ``scale`` [l, 2] (an unguided suffix shares its sample's scales) saturates at e4m3's range.
    bf16 | fp32 | fp8 only; ``encode_kv_arrays`` covers every dtype."""
    import torch

    if kv_dtype == "fp8" and scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32, device=kv.device)[:, :, None, None, None]
        q = (kv.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q.contiguous().view(torch.uint8).cpu().numpy(), np.asarray(scale, np.float32)
    if kv_dtype == "bf16":
        return kv.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16), None
    if kv_dtype == "fp32":
        return kv.float().contiguous().cpu().numpy(), None
    if kv_dtype == "fp8":
        x = kv.float()
        # Per (layer, K|V) scale so the largest magnitude maps to e4m3's max (448).
        amax = x.abs().amax(dim=(2, 3, 4)).clamp_min(1e-12)
        scale = amax / 448.0
        q = (x / scale[:, :, None, None, None]).to(torch.float8_e4m3fn)
        return q.contiguous().view(torch.uint8).cpu().numpy(), scale.cpu().numpy().astype(np.float32)
    raise UserError(f"--kv-dtype must be one of {KV_DTYPES}")


def encode_kv_arrays(kv: Any, kv_dtype: str, group: int | None = None) -> dict[str, np.ndarray]:
    """torch [l, 2, h, L, d] -> every K/V array of ``kv_dtype`` for disk, encoded on kv's own device
    (quantisation runs on the GPU in precompute; only the small result crosses to the host)."""
    if kv_dtype in Q.INT_BITS:
        group = Q.default_group(kv_dtype, kv.shape[-1]) if group is None else group
        codes, k_quant, v_quant = Q.quantize(kv, kv_dtype, group)
        return {KV: codes.cpu().numpy(), K_QUANT: k_quant.cpu().numpy(), V_QUANT: v_quant.cpu().numpy()}
    bits, scale = encode_kv(kv, kv_dtype)
    return {KV: bits} if scale is None else {KV: bits, KV_SCALE: scale}


def prompt_hidden_itemsize(kv_dtype: str) -> int:
    """Bytes per value of the stored prompt hidden states: fp32 in fp32 stores, else bf16 (fp8 would
    lose too much of the residual stream that every recomputed layer reads)."""
    return 4 if kv_dtype == "fp32" else 2


def encode_prompt_hidden(hidden: Any, kv_dtype: str) -> np.ndarray:
    """torch [L, D] -> bits for disk (bf16 bits as uint16, or fp32)."""
    import torch

    if prompt_hidden_itemsize(kv_dtype) == 4:
        return hidden.float().contiguous().cpu().numpy()
    return hidden.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def disk_dtype(kv_dtype: str) -> np.dtype:
    """numpy dtype of the stored K/V bits (zarr has no bfloat16, float8 or int4)."""
    return np.dtype({"bf16": np.uint16, "fp32": np.float32}.get(kv_dtype, np.uint8))


def dequantize(x: Any, scale: Any | None, dtype: Any) -> Any:
    """Stored K or V [b, h, t, d] -> ``dtype`` on its own device. ``scale`` [b] (fp8: one per sample,
    layer and K|V) multiplies in float32 before the cast, so no precision is lost on the way.
    int8/int4 codes go through ``quant.KVQuant.dequantize`` instead."""
    if scale is None:
        return x.to(dtype)
    return (x.float() * scale.float()[:, None, None, None]).to(dtype)
