"""The feature store's layout: a versioned product that readers check before trusting.

```
<store>/
  zarr.json                    root group; attrs["alpamayo_cache"] = StoreInfo (version, fingerprint, ...)
  samples/<sample_id>/         one committed sample = one zarr group (present here = committed)
    kv        [l, 2, h, L, d]  keys (0) and values (1) per VLM layer; bf16 bits as uint16, fp32, or fp8 bytes
    kv_scale  [l, 2]           fp8 only: per-layer dequantisation scale
    hidden    [D]              VLM last hidden state (after the final norm) at <|traj_future_start|>
    hist_xyz [16,3] hist_rot [16,3,3] fut_xyz [64,3] fut_rot [64,3,3] action [64,2]   float32, ego frame
    thumbs    [c, 48, 80, 3]   uint8 camera thumbnails (last frame of each camera) for plots
  staging/rank-<r>/<id>/       samples being written; renamed into samples/ when complete
  failures/rank-<r>.jsonl      clips that could not make a sample, with the reason
  locks/rank-<r>.lock          held by the writer of that rank
```
Every array carries a crc32c codec, so flipped or truncated bytes raise on read instead of
returning wrong numbers; a missing chunk (which zarr would fill with zeros) is checked separately.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

LAYOUT_VERSION = 1
STORE_ATTR = "alpamayo_cache"
SAMPLES_DIR = "samples"
STAGING_DIR = "staging"
FAILURES_DIR = "failures"
LOCKS_DIR = "locks"

KV = "kv"
KV_SCALE = "kv_scale"
HIDDEN = "hidden"
HIST_XYZ = "hist_xyz"
HIST_ROT = "hist_rot"
FUT_XYZ = "fut_xyz"
FUT_ROT = "fut_rot"
ACTION = "action"
THUMBS = "thumbs"
THUMB_SIZE = (48, 80)

KV_DTYPES = ("bf16", "fp32", "fp8")
# On-disk numpy dtype of each KV dtype (zarr has no bfloat16 / float8: store the raw bits).
KV_DISK_DTYPE = {"bf16": "uint16", "fp32": "float32", "fp8": "uint8"}
PROMPT_MODES = ("traj-only", "reasoning")


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

    @staticmethod
    def compute_fingerprint(
        model_identity: str, model_config: dict, prompt_mode: str, kv_dtype: str, compute_dtype: str
    ) -> str:
        payload = json.dumps(
            {
                "layout": LAYOUT_VERSION,
                "model": model_identity,
                "config": model_config,
                "prompt": prompt_mode,
                "kv_dtype": kv_dtype,
                "compute_dtype": compute_dtype,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreInfo:
        return cls(**data)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleInfo:
        return cls(**data)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    itemsize = {"bf16": 2, "fp32": 4, "fp8": 1}[kv_dtype]
    return num_layers * 2 * kv_heads * head_dim * itemsize
