"""Stage 3: compare the baseline policy and fine-tuned checkpoints on the same cached samples.

Never loads the VLM (only, for a ``--vlm-from-layer k`` store, its layers k.., which every model runs
again from the stored hidden states: the store's own for the baseline and expert-only runs, the trained
ones for ``--train vlm-top`` runs): every model sees identical cached features and, per sample, identical initial
noise (derived from the seed and the sample id), so differences are paired. Predictions are saved per
model and reused when the model file, store and sampling options are unchanged. Every input is
checked before any work starts, and a failed evaluation removes what it wrote.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache import metrics as M
from alpamayo_cache import reward_metrics as RM
from alpamayo_cache.config import ModelConfig
from alpamayo_cache.configs import EvalConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.action_space import UnicycleActionSpace, effective_stats
from alpamayo_cache.model.expert import Prefix
from alpamayo_cache.model.guidance import unguided_prefix
from alpamayo_cache.model.head import load_head
from alpamayo_cache.model.vlm_top import attach as attach_vlm_top
from alpamayo_cache.options import to_jsonable
from alpamayo_cache.runtime import autocast, compute_dtype, log, progress, resolve_device
from alpamayo_cache.store.dataset import CachedFeatures, collate, epoch_batches
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train.checkpoints import RunLock, is_run_folder, resolve_checkpoint
from alpamayo_cache.train.setup import check_head_matches_store, resolve_init

__all__ = ["EvalConfig", "run", "sample_noise"]


def run_folder_of(path: Path) -> Path | None:
    """The training-run folder (the one holding checkpoints/) that ``path`` is or lies in."""
    for folder in (path, *path.parents):
        if (folder / "checkpoints").is_dir():
            return folder
    return None


def default_out_dir(cfg: EvalConfig, checkpoints: list[str]) -> Path:
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    if checkpoints:
        run_folder = run_folder_of(Path(checkpoints[0]).resolve())
        if run_folder is not None:
            return run_folder / "eval"
    return Path("runs") / "eval"


def model_key(spec: str, cfg: EvalConfig, fingerprint: str, sample_ids: list[str]) -> str:
    """Identity of a prediction set: model file contents (or preset), store, samples, sampling options."""
    h = hashlib.sha256()
    path = Path(spec)
    if path.is_file():
        from alpamayo_cache.integrity import crc32c_file

        h.update(f"{crc32c_file(path)}:{path.stat().st_size}".encode())
    elif path.is_dir():
        for f in sorted(path.glob("*.safetensors*")):
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    else:
        h.update(spec.encode())
    options = [fingerprint, sample_ids, cfg.num_samples, cfg.num_steps, cfg.seed, cfg.attention]
    if cfg.guidance is not None:
        options.append(cfg.guidance)
    h.update(json.dumps(options).encode())
    return h.hexdigest()[:16]


def sample_noise(sample_id: str, seed: int, k: int, w: int) -> torch.Tensor:
    """Initial noise [k, w, 2] of one sample: the same for every model evaluated with this seed."""
    digest = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16)
    return torch.randn(k, w, 2, generator=torch.Generator().manual_seed(digest))


@torch.no_grad()
def predict(
    policy, head_cfg: ModelConfig, cfg: EvalConfig, dataset: CachedFeatures, device: str, dtype, label: str
) -> dict[str, np.ndarray]:
    """K trajectories per sample: xyz [n, K, w, 3], rot [n, K, w, 3, 3] in the ego frame at t0, and the
    normalised actions [n, K, w, 2] that made them (the rewards read their controls)."""
    policy.to(device=device, dtype=dtype).eval()
    space = UnicycleActionSpace(head_cfg.action_space)
    k, w = cfg.num_samples, head_cfg.n_waypoints
    xyz = np.zeros((len(dataset), k, w, 3), np.float32)
    rot = np.zeros((len(dataset), k, w, 3, 3), np.float32)
    action = np.zeros((len(dataset), k, w, 2), np.float32)
    batches = epoch_batches(dataset.lengths, cfg.micro_batch, seed=0, epoch=0, shuffle=False)
    for idx in progress(batches, len(batches), f"predict {label}", unit="batches"):
        batch = collate([dataset[i] for i in idx])
        prefix = Prefix.from_batch(batch).to(device)
        if not prefix.all_finite():
            raise UserError(
                f"non-finite features (NaN/Inf) in sample(s) {', '.join(batch.sample_ids)}: run `alpamayo-cache verify`"
            )
        noise = torch.stack([sample_noise(s, cfg.seed, k, w) for s in batch.sample_ids]).to(device)
        uncond = unguided_prefix(batch) if cfg.guidance is not None else None
        uncond = uncond.to(device) if uncond is not None else None
        with autocast(device, dtype):
            actions = policy.sample(prefix, noise, cfg.num_steps, uncond, cfg.guidance).float().cpu()
        hist_xyz = batch.hist_xyz.repeat_interleave(k, dim=0)
        hist_rot = batch.hist_rot.repeat_interleave(k, dim=0)
        p_xyz, p_rot = space.action_to_traj(actions.reshape(-1, w, 2), hist_xyz, hist_rot)
        xyz[idx] = p_xyz.reshape(len(idx), k, w, 3).numpy()
        rot[idx] = p_rot.reshape(len(idx), k, w, 3, 3).numpy()
        action[idx] = actions.numpy()
    return {"xyz": xyz, "rot": rot, "action": action}


def _model_name(spec: str, index: int) -> str:
    run_folder = run_folder_of(Path(spec))
    if run_folder is not None:
        return run_folder.name
    path = Path(spec)
    return path.stem if path.suffix else f"model{index + 1}"


def _load_models(
    cfg: EvalConfig, reader: StoreReader, store_cfg: ModelConfig
) -> dict[str, tuple[str, object, ModelConfig, str]]:
    """Every model to compare, loaded and checked against the store before any prediction runs."""
    specs = {"baseline": resolve_init(cfg.baseline, reader)}
    for i, ckpt in enumerate(cfg.checkpoints):
        name = _model_name(ckpt, i)
        if name in specs:
            name = f"{name}-{i + 1}"
        specs[name] = resolve_checkpoint(ckpt)
    models = {}
    for name, spec in specs.items():
        policy, head_cfg, described = load_head(spec, cfg.attention or None)
        check_head_matches_store(head_cfg, store_cfg, described)
        policy = attach_vlm_top(policy, spec, reader.info, store_cfg)  # --vlm-from-layer stores
        models[name] = (spec, policy, head_cfg, described)
    return models


def run(cfg: EvalConfig) -> dict:
    reader = StoreReader(cfg.store)
    log.info(
        f"eval: {cfg.store}, split {cfg.split}, baseline {cfg.baseline} vs {list(cfg.checkpoints) or 'nothing'}"
    )
    store_cfg = ModelConfig.from_dict(reader.info.model_config)
    sample_ids = reader.select(cfg.split, list(cfg.camera_sets) or None)
    if not sample_ids:
        raise UserError(f"split {cfg.split!r} of {cfg.store} has no samples to evaluate (try --split all)")
    if cfg.guidance is not None and not any(reader.sample_info(s).has_route for s in sample_ids):
        raise UserError(
            f"--guidance needs routed samples; none of the {len(sample_ids)} selected in {cfg.store} has a "
            "route: make the store with --route, or drop --guidance"
        )
    models = _load_models(cfg, reader, store_cfg)
    out = default_out_dir(cfg, [m[0] for n, m in models.items() if n != "baseline"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the report")
    run_folder = out.parent if is_run_folder(out.parent) else None
    lock = RunLock(run_folder, "eval") if run_folder is not None else None
    created: list[Path] = []
    try:
        return _evaluate(cfg, reader, store_cfg, sample_ids, models, out, created)
    except BaseException as exc:
        for path in reversed(created):  # a failed evaluation leaves nothing of its own behind
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing the evaluation into {out}: free space and run eval again"
            ) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def _predictions(cfg, models, dataset, out: Path, fingerprint: str, sample_ids, created: list[Path]) -> dict:
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.dtype)
    predictions = {}
    for name, (spec, policy, head_cfg, _) in models.items():
        path = out / "predictions" / f"{model_key(spec, cfg, fingerprint, sample_ids)}.npz"
        if path.is_file():
            with np.load(path) as data:
                predictions[name] = {k: data[k] for k in data.files}
            if "action" in predictions[name]:  # older files lack the actions the rewards read
                log.info(f"reusing predictions of {name} ({path.name})")
                continue
        predictions[name] = predict(policy, head_cfg, cfg, dataset, device, dtype, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        try:
            np.savez(tmp, **predictions[name])
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        created.append(path)
    return predictions


def _evaluate(
    cfg, reader: StoreReader, store_cfg: ModelConfig, sample_ids, models, out: Path, created
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dataset = CachedFeatures(cfg.store, sample_ids, reader)
    predictions = _predictions(cfg, models, dataset, out, reader.info.fingerprint, sample_ids, created)
    truth = [reader.read(s, prompt=False) for s in sample_ids]
    infos = {s: reader.sample_info(s) for s in sample_ids}
    per_sample: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    bins = []
    space = effective_stats(store_cfg.action_space)
    for i, sample in enumerate(truth):
        kappa = sample.action[:, 1].numpy() * space.curvature_std + space.curvature_mean
        bins.append(M.curvature_bin(float(np.abs(kappa).max())))
        gt_xyz, gt_rot = sample.fut_xyz.numpy(), sample.fut_rot.numpy()
        for name, pred in predictions.items():
            per_sample[name].append(M.sample_metrics(pred["xyz"][i], pred["rot"][i], gt_xyz, gt_rot))
    RM.add_reward_metrics(reader, sample_ids, truth, predictions, per_sample, space)
    specs = {name: m[0] for name, m in models.items()}
    clips = [infos[s].clip_id for s in sample_ids]  # the bootstrap resamples clips, not samples
    results = M.summarise(cfg, specs, per_sample, bins, [infos[s].camera_set for s in sample_ids], clips)
    RM.add_conventions(results)
    results["store"] = {
        "path": str(cfg.store),
        "fingerprint": reader.info.fingerprint,
        "prompt_mode": reader.info.prompt_mode,
    }
    results["config"] = to_jsonable(cfg)
    from alpamayo_cache import report

    run_folders = {name: run_folder_of(Path(m[0])) for name, m in models.items() if name != "baseline"}
    described = {name: m[3] for name, m in models.items()}
    results["provenance"] = report.provenance(cfg, reader, list(infos.values()), described, run_folders)
    _write(out / "metrics.json", json.dumps(results, indent=2), created)
    _write_per_sample(out / "per_sample.csv", sample_ids, bins, infos, per_sample, created)
    plot_files: list = []
    if cfg.plots:
        from alpamayo_cache import plots

        plot_files = plots.make_all(
            out,
            reader,
            sample_ids,
            truth,
            predictions,
            per_sample,
            bins,
            results,
            cfg.max_panels,
            cfg.seed,
            run_folders,
        )
        created.extend(out / p.file for p in plot_files)
    created.extend(report.write(out / "report.md", results, plot_files))
    log.info(f"eval report: {out / 'report.md'}")
    results["out_dir"] = str(out)
    return results


def _write(path: Path, text: str, created: list[Path]) -> None:
    path.write_text(text)
    created.append(path)


def _write_per_sample(path: Path, sample_ids, bins, infos, per_sample, created: list[Path]) -> None:
    metric_names = list(next(iter(per_sample.values()))[0].keys())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["sample_id", "clip_id", "t0_us", "camera_set", "curvature_bin", "model", *metric_names]
        )
        for name, rows in per_sample.items():
            for sid, b, row in zip(sample_ids, bins, rows, strict=True):
                info = infos[sid]
                writer.writerow(
                    [sid, info.clip_id, info.t0_us, info.camera_set, b, name, *[row[m] for m in metric_names]]
                )
    created.append(path)
