"""Stage 1: clips -> frozen VLM once per sample -> the zarr feature store.

``run(cfg)`` plans every (clip, keyframe, camera set) sample, prints the plan (samples, bytes, free
disk) and refuses a plan the disk cannot hold, then runs the VLM once per missing sample and commits
it. Re-running resumes: committed samples are skipped, half-written ones removed. Writing a sample
happens on a background thread while the next sample is decoded and encoded. Each sample also keeps
its front-wide camera frame at t0 (store/format.FRONT_IMAGE) and that camera's calibration record, for
the rewards of reward-weighted fine-tuning and eval.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.configs import SYNTHETIC, PrecomputeConfig
from alpamayo_cache.data.camera_model import FRONT_CAMERA, CameraView
from alpamayo_cache.data.routes import routes_digest
from alpamayo_cache.data.samples import (
    Sample,
    SampleSpec,
    camera_set,
    load_sample,
)
from alpamayo_cache.data.source import BadClip, ClipSource
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.model.pixels import resize_frames
from alpamayo_cache.precompute_plan import Plan, free_disk, kv_options_table, make_plan, prompt_camera_ids
from alpamayo_cache.runtime import (
    compute_dtype,
    dtype_name,
    human_bytes,
    log,
    progress,
    resolve_device,
    versions,
)
from alpamayo_cache.store import format as F
from alpamayo_cache.store.quant import default_group
from alpamayo_cache.store.reader import StoreReader
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
    probe, free = free_disk(store)
    one = plan.bytes_per_sample[cfg.camera_sets[0]]
    if model.route != "none":
        routed = sum(1 for c in plan.clips if c in plan.routes)
        log.info(
            f"routes: {routed} of {len(plan.clips)} clips have one (the others are made without a route)"
        )
    log.info(
        f"plan: {len(plan.specs)} samples from {len(plan.clips)} clips (rank {plan.rank}/{plan.world}), "
        f"{result.skipped} already committed, {len(plan.todo)} to write x ~{human_bytes(one)} = "
        f"{human_bytes(result.expected_bytes)} (K/V {kv_dtype}); free disk {human_bytes(free)}; "
        f"source: {plan.source.description}"
    )
    if cfg.dry_run:
        log.info(kv_options_table(cfg, plan, model, kv_dtype, len(plan.todo)))
        result.failed = dict(plan.clip_failures)
        return result
    if result.expected_bytes > cfg.disk_margin * free:
        raise UserError(
            f"the plan needs {human_bytes(result.expected_bytes)} but {probe} has {human_bytes(free)} free: "
            "use --limit, --kv-dtype fp8, or another --store"
        )
    _check_existing_store(store, cfg, model, kv_dtype)
    from alpamayo_cache.model.vlm import FrozenVLM

    log.info(f"loading the VLM ({model.name}) on {device} ...")
    folder = Path(cfg.model) if Path(cfg.model).is_dir() else None
    vlm = FrozenVLM(model, folder, cfg.tokenizer, device, dtype, from_layer=cfg.vlm_from_layer)
    info = _store_info(cfg, model, vlm, kv_dtype, dtype, device, plan.routes)
    writer = StoreWriter(store, info, rank=plan.rank)
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
    cfg: PrecomputeConfig, model: ModelConfig, vlm, kv_dtype: str, dtype, device: str, routes: dict[str, str]
) -> F.StoreInfo:
    inputs = {"routes": routes_digest(routes)} if routes else {}
    group = default_group(kv_dtype, model.text.head_dim)
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
            vlm.identity,
            model.to_dict(),
            cfg.prompt_mode,
            kv_dtype,
            dtype_name(dtype),
            inputs,
            group,
            cfg.vlm_from_layer,
        ),
        created_by=versions(device),
        inputs=inputs,
        front_image_hw=list(F.FRONT_IMAGE_SIZE),
        kv_group=group,
        vlm_from_layer=cfg.vlm_from_layer,
    )


def front_camera_record(source: ClipSource, clip_id: str) -> dict | None:
    """The front-wide camera's CameraView record for the stored front image; None when the clip has no
    (usable) calibration for it, and the rewards then treat its images as unknown."""
    try:
        calibration = source.calibration(clip_id)
        if calibration is None or FRONT_CAMERA not in calibration.cameras:
            return None
        view = CameraView.from_calibration(
            calibration.intrinsics[FRONT_CAMERA],
            calibration.extrinsics[FRONT_CAMERA],
            F.FRONT_IMAGE_SIZE,
            FRONT_CAMERA,
        )
    except Exception as exc:  # a damaged calibration costs the rewards their image, not the sample
        log.warning(f"clip {clip_id}: front camera calibration unusable, stored as absent ({exc})")
        return None
    return view.to_dict()


def _encode_all(
    cfg: PrecomputeConfig, plan: Plan, vlm, writer: StoreWriter, device: str
) -> tuple[int, dict[str, str]]:
    failures: dict[str, str] = {}
    written = 0
    pending: Future | None = None
    provenance = {**versions(device), "rank": writer.rank, "data": plan.source.description}
    space = UnicycleActionSpace(plan.model.action_space)
    front_cameras: dict[str, dict | None] = {}  # front camera record per clip (keyframes share it)
    with ThreadPoolExecutor(max_workers=1) as pool:  # one write in flight overlaps the next forward
        for spec in progress(plan.todo, len(plan.todo), "precompute"):
            try:
                sample = load_sample(
                    plan.source, spec, plan.model, max_gap_s=cfg.max_ego_gap_s, front_hw=F.FRONT_IMAGE_SIZE
                )
                cameras = camera_set(spec.camera_set, plan.model.cameras).cameras
                route = plan.routes.get(spec.clip_id)
                seed = cfg.seed * 1_000_003 + int(hashlib.sha256(spec.sample_id.encode()).hexdigest()[:8], 16)
                enc = vlm.encode(
                    sample.images,
                    sample.hist_xyz,
                    cfg.prompt_mode,
                    seed=seed,
                    max_reasoning_tokens=cfg.max_reasoning_tokens,
                    camera_ids=prompt_camera_ids(plan.model, cameras),
                    route=route,
                )
                arrays = sample_arrays(sample, enc, space, plan.kv_dtype)
                if spec.clip_id not in front_cameras:
                    front_cameras[spec.clip_id] = front_camera_record(plan.source, spec.clip_id)
            except BadClip as exc:
                failures[spec.sample_id] = str(exc)
                writer.record_failure(spec.sample_id, str(exc))
                continue
            front = front_cameras[spec.clip_id] if sample.front is not None else None
            info = _sample_info(spec, cameras, enc, route, provenance, front)
            if pending is not None:
                pending.result()
                written += 1
            pending = pool.submit(writer.write, info, arrays)
        if pending is not None:
            pending.result()
            written += 1
    return written, failures


def _sample_info(
    spec: SampleSpec, cameras, enc, route: str | None, provenance: dict, front_camera: dict | None
) -> F.SampleInfo:
    """The sample's attributes: where it comes from, its prefix, its route (with/without), the front
    camera record of its front image (None without calibration)."""
    routed = enc.uncond is not None
    writer = dict(provenance)
    if routed:  # the shared tokens' K/V, guided vs unguided prefill (0.0 in fp32 on CPU)
        n = enc.route_start
        diff = (enc.keys[:, :, :n].float() - enc.uncond.keys[:, :, :n].float()).abs().max() if n else 0.0
        writer["route_shared_kv_max_abs_diff"] = float(diff)
    return F.SampleInfo(
        sample_id=spec.sample_id,
        clip_id=spec.clip_id,
        t0_us=spec.t0_us,
        camera_set=spec.camera_set,
        cameras=list(cameras),
        split=spec.split,
        length=enc.length,
        rope_delta=enc.rope_delta,
        reasoning=enc.reasoning,
        writer=writer,
        front_camera=front_camera,
        has_route=routed,
        route=route or "",
        route_start=enc.route_start if routed else -1,
        uncond_length=enc.uncond.length if routed else 0,
        uncond_rope_delta=enc.uncond.rope_delta if routed else 0,
    )


def sample_arrays(sample: Sample, enc, space: UnicycleActionSpace, kv_dtype: str) -> dict[str, np.ndarray]:
    """Everything stored for one sample; non-finite features are refused (never committed). A routed
    sample also stores its unguided prefix from the first token that differs (``route_start``) on.
    An encoding with prompt hidden states (``--vlm-from-layer k``) keeps the K/V of layers < k only."""
    k = enc.keys.shape[0] if enc.prompt_hidden is None else enc.prompt_hidden_layer
    kv = torch.stack([enc.keys[:k], enc.values[:k]], dim=1)  # [l, 2, h, L, d]
    uncond = None
    if enc.uncond is not None:
        uncond = torch.stack([enc.uncond.keys, enc.uncond.values], dim=1)[:, :, :, enc.route_start :]
    checked = [
        ("kv", kv),
        ("hidden", enc.hidden),
        ("kv_uncond", uncond),
        ("prompt hidden states", enc.prompt_hidden),
    ]
    for name, value in checked:
        if value is not None and not bool(torch.isfinite(value).all()):
            raise BadClip(f"non-finite features: the VLM produced NaN/Inf in {name}")
    # Encoded on the VLM's device: only the encoded bytes cross to the host.
    kv_arrays = F.encode_kv_arrays(kv, kv_dtype, default_group(kv_dtype, kv.shape[-1]))
    hist_xyz, hist_rot = torch.from_numpy(sample.hist_xyz), torch.from_numpy(sample.hist_rot)
    fut_xyz, fut_rot = torch.from_numpy(sample.fut_xyz), torch.from_numpy(sample.fut_rot)
    action = space.traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot)
    if not bool(torch.isfinite(action).all()):
        raise BadClip("bad egomotion: the trajectory gives non-finite actions")
    arrays = {
        **kv_arrays,
        F.HIDDEN: enc.hidden.cpu().numpy().astype(np.float32),
        F.HIST_XYZ: sample.hist_xyz,
        F.HIST_ROT: sample.hist_rot,
        F.FUT_XYZ: sample.fut_xyz,
        F.FUT_ROT: sample.fut_rot,
        F.ACTION: action.numpy().astype(np.float32),
        F.THUMBS: resize_frames(np.ascontiguousarray(sample.images[:, -1]), F.THUMB_SIZE),
        # black when the clip has no readable front camera (its camera record is then None)
        F.FRONT_IMAGE: sample.front
        if sample.front is not None
        else np.zeros((*F.FRONT_IMAGE_SIZE, 3), np.uint8),
    }
    if uncond is not None:  # routes are refused with int8/int4 before any work (make_plan)
        arrays[F.KV_UNCOND] = F.encode_kv(uncond, kv_dtype, kv_arrays.get(F.KV_SCALE))[0]
    if enc.prompt_hidden is not None:
        arrays[F.PROMPT_HIDDEN] = F.encode_prompt_hidden(enc.prompt_hidden, kv_dtype)
        arrays[F.POSITION_IDS] = enc.position_ids.cpu().numpy().astype(np.int32)
        if not bool((enc.mask == 1).all()):
            arrays[F.PROMPT_MASK] = enc.mask.cpu().numpy().astype(np.uint8)
    return arrays


def _check_existing_store(store: Path, cfg: PrecomputeConfig, model: ModelConfig, kv_dtype: str) -> None:
    """Refuse a store of other options before the (minutes-long) VLM load; the writer then checks the
    whole fingerprint, which needs the loaded VLM's identity."""
    if not (Path(store) / "zarr.json").is_file():
        return
    stored = F.read_info(store)
    config = json.loads(json.dumps(model.to_dict()))  # as stored: tuples become lists
    mine = (model.name, config, cfg.prompt_mode, kv_dtype, cfg.vlm_from_layer)
    theirs = (
        stored.model_name,
        stored.model_config,
        stored.prompt_mode,
        stored.kv_dtype,
        stored.vlm_from_layer,
    )
    if mine != theirs:
        raise UserError(
            f"store {store} was made by {stored.model_name}/{stored.prompt_mode}/kv {stored.kv_dtype}"
            f"{'' if stored.vlm_from_layer is None else f'/vlm-from-layer {stored.vlm_from_layer}'} (fingerprint "
            f"{stored.fingerprint}); this run "
            f"is {model.name}/{cfg.prompt_mode}/kv {kv_dtype}: use another --store or the store's options"
        )


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
    splits = Counter(info.split for info in StoreReader(result.store).sample_infos().values())
    if not splits.get("val"):
        log.warning(
            f"{result.store} has no 'val' samples (clips are held out by a hash of their id, --val-percent): "
            "train gets no validation loss and eval needs --split all or more clips"
        )
