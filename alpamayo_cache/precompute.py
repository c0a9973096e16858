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

from alpamayo_cache.config import ALL_CAMERAS, ModelConfig, resolve_model
from alpamayo_cache.configs import SYNTHETIC, PrecomputeConfig
from alpamayo_cache.data.samples import (
    Sample,
    SampleSpec,
    camera_set,
    check_policy,
    load_sample,
    plan_samples,
)
from alpamayo_cache.data.source import BadClip, ClipSource, open_source
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.model.pixels import resize_frames
from alpamayo_cache.runtime import (
    compute_dtype,
    dist_rank,
    dtype_name,
    human_bytes,
    log,
    progress,
    resolve_device,
    versions,
)
from alpamayo_cache.store import format as F
from alpamayo_cache.store.writer import StoreWriter

__all__ = ["PrecomputeConfig", "PrecomputeResult", "SYNTHETIC", "run"]


@dataclass
class PrecomputeResult:
    store: Path
    planned: int = 0
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    removed_partial: int = 0
    expected_bytes: int = 0


@dataclass
class Plan:
    model: ModelConfig
    source: ClipSource
    clips: list[str]
    specs: list[SampleSpec]
    clip_failures: list[tuple[str, str]]
    todo: list[SampleSpec]
    bytes_per_sample: dict[str, int]  # by camera set
    kv_dtype: str
    rank: int
    world: int

    @property
    def expected_bytes(self) -> int:
        return sum(self.bytes_per_sample[s.camera_set] for s in self.todo)


def resolve_data(cfg: PrecomputeConfig) -> Path:
    if cfg.data != SYNTHETIC:
        return Path(cfg.data)
    from alpamayo_cache.data.synthetic import write_dataset

    write_dataset(cfg.synthetic_dir, n_clips=cfg.synthetic_clips, seed=cfg.seed, cameras=ALL_CAMERAS)
    return cfg.synthetic_dir


def read_clip_list(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"clip list {path} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"clip list {path} is not a text file: write one clip id per line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def select_clips(all_ids: list[str], cfg: PrecomputeConfig, rank: int, world: int) -> list[str]:
    if cfg.clips_file is not None:
        wanted = read_clip_list(cfg.clips_file)
        known = set(all_ids)
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise UserError(
                f"clip {unknown[0][:80]} from {cfg.clips_file} is not in the dataset ({len(unknown)} unknown)"
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
    from alpamayo_cache.model.prompt import PromptBuilder, tokens_per_image

    n_images = len(camera_set(camera_set_name, model.cameras).cameras) * model.frames_per_camera
    history = np.zeros((model.history_steps, 3), np.float32)
    length = len(PromptBuilder(tokenizer, model).build([tokens_per_image(model)] * n_images, history, mode))
    return length + (0 if mode == "traj-only" else 1)  # reasoning: at least <|traj_future_start|> follows


def make_plan(cfg: PrecomputeConfig, model: ModelConfig, kv_dtype: str) -> Plan:
    rank, world = dist_rank()
    rank = cfg.rank if cfg.rank is not None else rank
    world = cfg.world_size if cfg.world_size is not None else world
    if not 0 <= rank < world:
        raise UserError(f"--rank {rank} must be in [0, --world-size {world})")
    for name in cfg.camera_sets:
        camera_set(name, model.cameras)  # bad names fail before any data is touched
    check_policy(cfg.keyframes)
    source = open_source(resolve_data(cfg), revision=cfg.revision, reader=cfg.reader)
    clips = select_clips(source.clip_ids(), cfg, rank, world)
    specs, clip_failures = plan_samples(
        source, model, clips, cfg.keyframes, list(cfg.camera_sets), cfg.val_percent
    )
    from alpamayo_cache.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        model, cfg.tokenizer or (Path(cfg.model) if Path(cfg.model).is_dir() else None)
    )
    t = model.text
    per_sample = {
        name: F.sample_bytes(
            expected_prefix_length(model, name, cfg.prompt_mode, tokenizer),
            t.num_layers,
            t.num_kv_heads,
            t.head_dim,
            kv_dtype,
            t.hidden_size,
            len(camera_set(name, model.cameras).cameras),
            vlm_from_layer=cfg.vlm_from_layer,
        )
        for name in cfg.camera_sets
    }
    committed = set(F.committed_samples(cfg.store)) if Path(cfg.store).is_dir() else set()
    todo = [s for s in specs if s.sample_id not in committed]
    return Plan(model, source, clips, specs, clip_failures, todo, per_sample, kv_dtype, rank, world)


def _free_disk(store: Path) -> tuple[Path, int]:
    probe = store if store.exists() else next(p for p in store.parents if p.exists())
    return probe, shutil.disk_usage(probe).free


def run(cfg: PrecomputeConfig) -> PrecomputeResult:
    store = Path(cfg.store)
    if store.exists() and not store.is_dir():
        raise UserError(f"--store {store} is a file: pass a folder for the store")
    if cfg.data != SYNTHETIC and not Path(cfg.data).exists():
        raise UserError(
            f"dataset folder {cfg.data} does not exist: download PhysicalAI-AV there or use --data synthetic"
        )
    model = resolve_model(cfg.model)
    if cfg.vlm_from_layer is not None:
        from alpamayo_cache.model.vlm_top import check_first_layer

        check_first_layer(model, cfg.vlm_from_layer)
    log.info(f"precompute: {cfg.data} -> {store} (model {model.name}, {cfg.prompt_mode}); planning ...")
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.dtype)
    kv_dtype = dtype_name(dtype) if cfg.kv_dtype == "auto" else cfg.kv_dtype
    plan = make_plan(cfg, model, kv_dtype)
    result = PrecomputeResult(store=store, planned=len(plan.specs), skipped=len(plan.specs) - len(plan.todo))
    result.expected_bytes = plan.expected_bytes
    probe, free = _free_disk(store)
    one = plan.bytes_per_sample[cfg.camera_sets[0]]
    log.info(
        f"plan: {len(plan.specs)} samples from {len(plan.clips)} clips (rank {plan.rank}/{plan.world}), "
        f"{result.skipped} already committed, {len(plan.todo)} to write x ~{human_bytes(one)} = "
        f"{human_bytes(result.expected_bytes)} (K/V {kv_dtype}); free disk {human_bytes(free)}; "
        f"source: {plan.source.description}"
    )
    if cfg.dry_run:
        result.failed = dict(plan.clip_failures)
        return result
    if result.expected_bytes > cfg.disk_margin * free:
        raise UserError(
            f"the plan needs {human_bytes(result.expected_bytes)} but {probe} has {human_bytes(free)} free: "
            "use --limit, --kv-dtype fp8, or another --store"
        )
    from alpamayo_cache.model.vlm import FrozenVLM

    log.info(f"loading the VLM ({model.name}) on {device} ...")
    folder = Path(cfg.model) if Path(cfg.model).is_dir() else None
    vlm = FrozenVLM(model, folder, cfg.tokenizer, device, dtype, from_layer=cfg.vlm_from_layer)
    writer = StoreWriter(store, _store_info(cfg, model, vlm, kv_dtype, dtype, device), rank=plan.rank)
    result.removed_partial = writer.removed_partial
    if writer.removed_partial:
        log.info(f"removed {writer.removed_partial} half-written sample(s) left by an interrupted run")
    for clip_id, reason in plan.clip_failures:
        writer.record_failure(clip_id, reason)
    try:
        result.written, failures = _encode_all(cfg, plan, vlm, writer, device)
    finally:
        writer.close()
    result.failed = {**dict(plan.clip_failures), **failures}
    _summarise(result)
    return result


def _store_info(
    cfg: PrecomputeConfig, model: ModelConfig, vlm, kv_dtype: str, dtype, device: str
) -> F.StoreInfo:
    return F.StoreInfo(
        layout_version=F.LAYOUT_VERSION,
        model_name=model.name,
        model_identity=vlm.identity,
        model_config=model.to_dict(),
        prompt_mode=cfg.prompt_mode,
        kv_dtype=kv_dtype,
        compute_dtype=dtype_name(dtype),
        attn_implementation=vlm.model.config._attn_implementation,
        fingerprint=F.StoreInfo.compute_fingerprint(
            vlm.identity, model.to_dict(), cfg.prompt_mode, kv_dtype, dtype_name(dtype), cfg.vlm_from_layer
        ),
        created_by=versions(device),
        vlm_from_layer=cfg.vlm_from_layer,
    )


def _encode_all(
    cfg: PrecomputeConfig, plan: Plan, vlm, writer: StoreWriter, device: str
) -> tuple[int, dict[str, str]]:
    failures: dict[str, str] = {}
    written = 0
    pending: Future | None = None
    provenance = {**versions(device), "rank": writer.rank, "data": plan.source.description}
    space = UnicycleActionSpace(plan.model.action_space)
    with ThreadPoolExecutor(max_workers=1) as pool:  # one write in flight overlaps the next forward
        for spec in progress(plan.todo, len(plan.todo), "precompute"):
            try:
                sample = load_sample(plan.source, spec, plan.model, max_gap_s=cfg.max_ego_gap_s)
                seed = cfg.seed * 1_000_003 + int(hashlib.sha256(spec.sample_id.encode()).hexdigest()[:8], 16)
                enc = vlm.encode(
                    sample.images,
                    sample.hist_xyz,
                    cfg.prompt_mode,
                    seed=seed,
                    max_reasoning_tokens=cfg.max_reasoning_tokens,
                )
                arrays = sample_arrays(sample, enc, space, plan.kv_dtype)
            except BadClip as exc:
                failures[spec.sample_id] = str(exc)
                writer.record_failure(spec.sample_id, str(exc))
                continue
            info = F.SampleInfo(
                sample_id=spec.sample_id,
                clip_id=spec.clip_id,
                t0_us=spec.t0_us,
                camera_set=spec.camera_set,
                cameras=list(camera_set(spec.camera_set, plan.model.cameras).cameras),
                split=spec.split,
                length=enc.length,
                rope_delta=enc.rope_delta,
                reasoning=enc.reasoning,
                writer=provenance,
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
    """Everything stored for one sample; non-finite features are refused (never committed).
    An encoding with prompt hidden states (``--vlm-from-layer k``) keeps the K/V of layers < k only."""
    k = enc.keys.shape[0] if enc.prompt_hidden is None else enc.prompt_hidden_layer
    kv = torch.stack([enc.keys[:k], enc.values[:k]], dim=1)  # [l, 2, h, L, d]
    checked = [("kv", kv), ("hidden", enc.hidden)]
    if enc.prompt_hidden is not None:
        checked.append(("prompt hidden states", enc.prompt_hidden))
    for name, value in checked:
        if not bool(torch.isfinite(value).all()):
            raise BadClip(f"non-finite features: the VLM produced NaN/Inf in {name}")
    bits, scale = F.encode_kv(kv, kv_dtype)
    hist_xyz, hist_rot = torch.from_numpy(sample.hist_xyz), torch.from_numpy(sample.hist_rot)
    fut_xyz, fut_rot = torch.from_numpy(sample.fut_xyz), torch.from_numpy(sample.fut_rot)
    action = space.traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot)
    if not bool(torch.isfinite(action).all()):
        raise BadClip("bad egomotion: the trajectory gives non-finite actions")
    arrays = {
        F.KV: bits,
        F.HIDDEN: enc.hidden.cpu().numpy().astype(np.float32),
        F.HIST_XYZ: sample.hist_xyz,
        F.HIST_ROT: sample.hist_rot,
        F.FUT_XYZ: sample.fut_xyz,
        F.FUT_ROT: sample.fut_rot,
        F.ACTION: action.numpy().astype(np.float32),
        F.THUMBS: resize_frames(np.ascontiguousarray(sample.images[:, -1]), F.THUMB_SIZE),
    }
    if scale is not None:
        arrays[F.KV_SCALE] = scale
    if enc.prompt_hidden is not None:
        arrays[F.PROMPT_HIDDEN] = F.encode_prompt_hidden(enc.prompt_hidden, kv_dtype)
        arrays[F.POSITION_IDS] = enc.position_ids.cpu().numpy().astype(np.int32)
        if not bool((enc.mask == 1).all()):
            arrays[F.PROMPT_MASK] = enc.mask.cpu().numpy().astype(np.uint8)
    return arrays


def _summarise(result: PrecomputeResult) -> None:
    log.info(
        f"precompute done: {result.written} written, {result.skipped} already there, {len(result.failed)} failed -> {result.store}"
    )
    if result.failed:
        reasons = Counter(reason.split(":")[0] for reason in result.failed.values())  # the category
        for reason, n in reasons.most_common():
            log.info(f"  failed x{n}: {reason}")
        log.info(f"  every failure with its reason: {result.store / F.FAILURES_DIR}")
    if result.written + result.skipped == 0:
        top = Counter(reason.split(":")[0] for reason in result.failed.values()).most_common(1)
        why = f" (most common reason: {top[0][0]})" if top else ""
        raise UserError(f"no sample could be made{why}: see {result.store / F.FAILURES_DIR} for every reason")
