"""Stage 1: clips -> frozen VLM once per sample -> the zarr feature store.

``run(cfg)`` plans every (clip, keyframe, camera set) sample, prints the plan (samples, bytes, free
disk) and refuses a plan the disk cannot hold, then runs the VLM once per missing sample and commits
it. Re-running resumes: committed samples are skipped, half-written ones removed. Writing a sample
happens on a background thread while the next sample is decoded and encoded.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.data.samples import (
    Sample,
    SampleSpec,
    camera_set,
    check_policy,
    load_sample,
    plan_samples,
    resize_frames,
)
from alpamayo_cache.data.source import BadClip, open_source
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.runtime import (
    compute_dtype,
    dist_rank,
    dtype_name,
    log,
    progress,
    resolve_device,
    versions,
)
from alpamayo_cache.store import layout as L
from alpamayo_cache.store.reader import encode_kv
from alpamayo_cache.store.writer import StoreWriter

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class PrecomputeConfig:
    store: Path = Path("cache_store/tiny-traj-only")
    data: str = SYNTHETIC  # a local PhysicalAI-AV folder / hub cache, or "synthetic"
    model: str = "tiny"  # preset name or a local Alpamayo-R1 checkpoint folder
    tokenizer: Path | None = None
    prompt_mode: str = "traj-only"
    keyframes: str = "default"
    camera_sets: tuple[str, ...] = ("default",)
    clips_file: Path | None = None
    limit: int | None = None
    val_percent: int = 10
    kv_dtype: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    reader: str = "auto"
    revision: str | None = None
    rank: int | None = None
    world_size: int | None = None
    synthetic_clips: int = 48
    synthetic_dir: Path = Path("cache_store/synthetic-data")
    seed: int = 0
    max_reasoning_tokens: int = 32
    dry_run: bool = False
    # Fraction of free disk a plan may use before it is refused.
    disk_margin: float = 0.95

    def __post_init__(self) -> None:
        if self.prompt_mode not in L.PROMPT_MODES:
            raise UserError(f"--prompt-mode must be one of {L.PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.kv_dtype not in ("auto", *L.KV_DTYPES):
            raise UserError(f"--kv-dtype must be auto or one of {L.KV_DTYPES}, got {self.kv_dtype!r}")
        if not 0 <= self.val_percent <= 100:
            raise UserError("--val-percent must be between 0 and 100")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be at least 1")


@dataclass
class PrecomputeResult:
    store: Path
    planned: int = 0
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    removed_partial: int = 0
    expected_bytes: int = 0


def resolve_data(cfg: PrecomputeConfig, model: ModelConfig) -> Path:
    if cfg.data != SYNTHETIC:
        return Path(cfg.data)
    from alpamayo_cache.config import ALL_CAMERAS
    from alpamayo_cache.data.synthetic import write_dataset

    write_dataset(cfg.synthetic_dir, n_clips=cfg.synthetic_clips, seed=cfg.seed, cameras=ALL_CAMERAS)
    return cfg.synthetic_dir


def select_clips(all_ids: list[str], cfg: PrecomputeConfig, rank: int, world: int) -> list[str]:
    if cfg.clips_file is not None:
        if not Path(cfg.clips_file).is_file():
            raise UserError(f"clip list {cfg.clips_file} does not exist")
        wanted = [
            line.strip()
            for line in Path(cfg.clips_file).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        known = set(all_ids)
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise UserError(
                f"clip {unknown[0]} from {cfg.clips_file} is not in the dataset ({len(unknown)} unknown)"
            )
        ids = wanted
    else:
        ids = sorted(all_ids)
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    if not ids:
        raise UserError("the clip list is empty: check --clips / --limit and the dataset folder")
    return ids[rank::world]


def expected_prefix_length(model: ModelConfig, camera_set_name: str, mode: str, tokenizer) -> int:
    """Prompt tokens L of one sample (exact for traj-only; reasoning adds its sampled text)."""
    from alpamayo_cache.model.vlm import PromptBuilder

    h, w = model.image_size
    merged = model.vision.patch_size * model.vision.spatial_merge_size
    per_image = (h // merged) * (w // merged)
    n_images = len(camera_set(camera_set_name, model.cameras).cameras) * model.frames_per_camera
    history = np.zeros((model.history_steps, 3))
    return len(PromptBuilder(tokenizer, model).build([per_image] * n_images, history, mode))


def run(cfg: PrecomputeConfig) -> PrecomputeResult:
    model = resolve_model(cfg.model)
    rank, world = dist_rank()
    rank = cfg.rank if cfg.rank is not None else rank
    world = cfg.world_size if cfg.world_size is not None else world
    if not 0 <= rank < world:
        raise UserError(f"--rank {rank} must be in [0, --world-size {world})")
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.dtype)
    kv_dtype = dtype_name(dtype) if cfg.kv_dtype == "auto" else cfg.kv_dtype

    for name in cfg.camera_sets:
        camera_set(name, model.cameras)  # bad names fail before any data is touched
    check_policy(cfg.keyframes)
    source = open_source(resolve_data(cfg, model), revision=cfg.revision, reader=cfg.reader)
    clips = select_clips(source.clip_ids(), cfg, rank, world)
    specs, clip_failures = plan_samples(
        source, model, clips, cfg.keyframes, list(cfg.camera_sets), cfg.val_percent
    )

    per_token = L.kv_bytes_per_token(
        model.text.num_layers, model.text.num_kv_heads, model.text.head_dim, kv_dtype
    )
    model_folder = Path(cfg.model) if Path(cfg.model).is_dir() else None
    tokenizer_folder = cfg.tokenizer or model_folder
    from alpamayo_cache.model.vlm import load_tokenizer

    tokenizer = load_tokenizer(model, tokenizer_folder)  # loaded once for the plan
    lengths = {
        name: expected_prefix_length(model, name, cfg.prompt_mode, tokenizer) for name in cfg.camera_sets
    }
    result = PrecomputeResult(store=Path(cfg.store), planned=len(specs))
    store_root = Path(cfg.store)
    committed = (
        {p.name for p in (store_root / L.SAMPLES_DIR).iterdir()}
        if (store_root / L.SAMPLES_DIR).is_dir()
        else set()
    )
    todo = [s for s in specs if s.sample_id not in committed]
    result.skipped = len(specs) - len(todo)
    result.expected_bytes = sum(lengths[s.camera_set] * per_token for s in todo)
    probe = store_root if store_root.exists() else next(p for p in store_root.parents if p.exists())
    free = shutil.disk_usage(probe).free
    log.info(
        f"plan: {len(specs)} samples from {len(clips)} clips (rank {rank}/{world}), {result.skipped} already committed, "
        f"{len(todo)} to write x ~{lengths[cfg.camera_sets[0]] * per_token / 1e6:.1f} MB = {result.expected_bytes / 1e9:.2f} GB; "
        f"free disk {free / 1e9:.1f} GB; source: {source.description}"
    )
    if cfg.dry_run:
        result.failed = dict(clip_failures)
        return result
    if result.expected_bytes > cfg.disk_margin * free:
        raise UserError(
            f"the plan needs {result.expected_bytes / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free: "
            "use --limit, --kv-dtype fp8, or another --store"
        )

    from alpamayo_cache.model.vlm import FrozenVLM

    vlm = FrozenVLM(
        model, Path(cfg.model) if Path(cfg.model).is_dir() else None, cfg.tokenizer, device, dtype
    )
    info = L.StoreInfo(
        layout_version=L.LAYOUT_VERSION,
        model_name=model.name,
        model_identity=vlm.identity,
        model_config=model.to_dict(),
        prompt_mode=cfg.prompt_mode,
        kv_dtype=kv_dtype,
        compute_dtype=dtype_name(dtype),
        attn_implementation=vlm.model.config._attn_implementation,
        fingerprint=L.StoreInfo.compute_fingerprint(
            vlm.identity, model.to_dict(), cfg.prompt_mode, kv_dtype, dtype_name(dtype)
        ),
        created_by=versions(device),
    )
    writer = StoreWriter(store_root, info, rank=rank)
    result.removed_partial = writer.removed_partial
    if writer.removed_partial:
        log.info(f"removed {writer.removed_partial} half-written sample(s) left by an interrupted run")
    for clip_id, reason in clip_failures:
        writer.record_failure(clip_id, reason)
    space = UnicycleActionSpace(model.action_space)
    try:
        result.written, failures = _encode_all(cfg, model, vlm, writer, source, todo, space, kv_dtype, device)
    finally:
        writer.close()
    result.failed = {**dict(clip_failures), **failures}
    _summarise(result)
    return result


def _encode_all(
    cfg, model, vlm, writer, source, todo: list[SampleSpec], space, kv_dtype, device
) -> tuple[int, dict[str, str]]:
    failures: dict[str, str] = {}
    written = 0
    pending: Future | None = None
    provenance = versions(device)
    with ThreadPoolExecutor(max_workers=1) as pool:  # one write in flight overlaps the next forward
        for spec in progress(todo, len(todo), "precompute"):
            try:
                sample = load_sample(source, spec, model)
            except BadClip as exc:
                failures[spec.sample_id] = str(exc)
                writer.record_failure(spec.sample_id, str(exc))
                continue
            seed = cfg.seed * 1_000_003 + int(
                hashlib.sha256(spec.sample_id.encode()).hexdigest()[:8], 16
            )  # reasoning sampling
            enc = vlm.encode(
                sample.images,
                sample.hist_xyz,
                cfg.prompt_mode,
                seed=seed,
                max_reasoning_tokens=cfg.max_reasoning_tokens,
            )
            arrays = sample_arrays(sample, enc, space, kv_dtype)
            info = L.SampleInfo(
                sample_id=spec.sample_id,
                clip_id=spec.clip_id,
                t0_us=spec.t0_us,
                camera_set=spec.camera_set,
                cameras=list(camera_set(spec.camera_set, model.cameras).cameras),
                split=spec.split,
                length=enc.length,
                rope_delta=enc.rope_delta,
                reasoning=enc.reasoning,
                writer={**provenance, "rank": writer.rank, "data": source.description},
            )
            if pending is not None:
                pending.result()
                written += 1
            pending = pool.submit(writer.write, info, arrays)
        if pending is not None:
            pending.result()
            written += 1
    return written, failures


def sample_arrays(sample: Sample, enc, space: UnicycleActionSpace, kv_dtype: str) -> dict[str, np.ndarray]:
    kv = torch.stack([enc.keys, enc.values], dim=1).cpu()  # [l, 2, h, L, d]
    bits, scale = encode_kv(kv, kv_dtype)
    hist_xyz, hist_rot = torch.from_numpy(sample.hist_xyz), torch.from_numpy(sample.hist_rot)
    fut_xyz, fut_rot = torch.from_numpy(sample.fut_xyz), torch.from_numpy(sample.fut_rot)
    action = space.traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot)
    thumbs = resize_frames(sample.images[:, -1], L.THUMB_SIZE)
    arrays = {
        L.KV: bits,
        L.HIDDEN: enc.hidden.cpu().numpy().astype(np.float32),
        L.HIST_XYZ: sample.hist_xyz,
        L.HIST_ROT: sample.hist_rot,
        L.FUT_XYZ: sample.fut_xyz,
        L.FUT_ROT: sample.fut_rot,
        L.ACTION: action.numpy().astype(np.float32),
        L.THUMBS: thumbs,
    }
    if scale is not None:
        arrays[L.KV_SCALE] = scale
    return arrays


def _summarise(result: PrecomputeResult) -> None:
    log.info(
        f"precompute done: {result.written} written, {result.skipped} already there, {len(result.failed)} failed -> {result.store}"
    )
    if result.failed:
        reasons = Counter(reason.split(":")[0] for reason in result.failed.values())  # the category
        for reason, n in reasons.most_common():
            log.info(f"  failed x{n}: {reason}")
        log.info(f"  every failure with its reason: {result.store / L.FAILURES_DIR}")
