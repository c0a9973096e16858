"""Stage 3: compare the baseline head and fine-tuned checkpoints on the same cached samples.

Never loads the VLM: every model sees identical cached features and, per sample, identical initial
noise (derived from the seed and the sample id), so differences are paired. Predictions are saved per
model and reused when the model file, store and sampling options are unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alpamayo_cache import metrics as M
from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.model import flow_matching as fm
from alpamayo_cache.model.action_space import UnicycleActionSpace
from alpamayo_cache.model.head import load_head
from alpamayo_cache.runtime import autocast, compute_dtype, log, progress, resolve_device
from alpamayo_cache.store.dataset import CachedFeatures, collate, epoch_batches
from alpamayo_cache.store.reader import StoreReader
from alpamayo_cache.train import check_head_matches_store, resolve_init
from alpamayo_cache.train_state import latest_checkpoint

KEY_METRICS = (
    "min_ade",
    "min_ade/by_t=3.0",
    "ade",
    "min_fde",
    "corner_distance",
    "lateral_error_6.4s",
    "heading_error_deg",
)


@dataclass(frozen=True)
class EvalConfig:
    store: Path = Path("cache_store/tiny-traj-only")
    baseline: str = "auto"  # auto (the store's preset) | preset | released folder | checkpoint
    checkpoints: tuple[str, ...] = ()
    out_dir: Path | None = None
    split: str = "val"
    camera_sets: tuple[str, ...] = ()
    num_samples: int = 6
    num_steps: int = 10
    seed: int = 0
    micro_batch: int = 8
    attention: str = ""
    device: str = "auto"
    dtype: str = "auto"
    bootstrap: int = 2000
    plots: bool = True
    max_panels: int = 8

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_steps < 1:
            raise UserError("--num-samples and --num-steps must be at least 1")


def run_folder_of(path: Path) -> Path | None:
    """The training-run folder (the one holding checkpoints/) that ``path`` is or lies in."""
    for folder in (path, *path.parents):
        if (folder / "checkpoints").is_dir():
            return folder
    return None


def resolve_checkpoint(spec: str) -> str:
    """A run folder means its latest checkpoint's head file."""
    path = Path(spec)
    if path.is_dir() and (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"run folder {path} has no complete checkpoint yet")
        return str(ckpt / "head.safetensors")
    if path.is_dir() and (path / "head.safetensors").is_file():
        return str(path / "head.safetensors")
    return spec


def default_out_dir(cfg: EvalConfig) -> Path:
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    if cfg.checkpoints:
        run_folder = run_folder_of(Path(resolve_checkpoint(cfg.checkpoints[0])).resolve())
        if run_folder is not None:
            return run_folder / "eval"
    return Path("runs") / "eval"


def model_key(spec: str, cfg: EvalConfig, fingerprint: str, sample_ids: list[str]) -> str:
    """Identity of a prediction set: model file contents (or preset), store, samples, sampling options."""
    h = hashlib.sha256()
    path = Path(spec)
    if path.is_file():
        h.update(hashlib.sha256(path.read_bytes()).digest())
    elif path.is_dir():
        for f in sorted(path.glob("*.safetensors*")):
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    else:
        h.update(spec.encode())
    h.update(
        json.dumps(
            [fingerprint, sample_ids, cfg.num_samples, cfg.num_steps, cfg.seed, cfg.attention]
        ).encode()
    )
    return h.hexdigest()[:16]


def sample_noise(sample_id: str, seed: int, k: int, w: int) -> torch.Tensor:
    """Initial noise [k, w, 2] of one sample: the same for every model evaluated with this seed."""
    digest = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16)
    return torch.randn(k, w, 2, generator=torch.Generator().manual_seed(digest))


@torch.no_grad()
def predict(
    spec: str, cfg: EvalConfig, dataset: CachedFeatures, store_cfg: ModelConfig, device: str, dtype
) -> dict[str, np.ndarray]:
    head, head_cfg, described = load_head(spec, cfg.attention or None)
    check_head_matches_store(head_cfg, store_cfg, described)
    head.to(device=device, dtype=dtype).eval()
    space = UnicycleActionSpace(head_cfg.action_space)
    k, w = cfg.num_samples, head_cfg.n_waypoints
    xyz = np.zeros((len(dataset), k, w, 3), np.float32)
    rot = np.zeros((len(dataset), k, w, 3, 3), np.float32)
    batches = epoch_batches(dataset.lengths, cfg.micro_batch, seed=0, epoch=0, shuffle=False)
    for idx in progress(batches, len(batches), f"predict {Path(spec).name or spec}", unit="batches"):
        batch = collate([dataset[i] for i in idx])
        prefix = batch.prefix.to(device, dtype=dtype).repeat(k)
        noise = torch.cat([sample_noise(s, cfg.seed, k, w) for s in batch.sample_ids]).to(device)

        def velocity(x, t, prefix=prefix):
            with autocast(device, dtype):
                return head(x, t, prefix).float()

        actions = fm.euler_sample(velocity, noise, cfg.num_steps).cpu()
        hist_xyz = batch.hist_xyz.repeat_interleave(k, dim=0)
        hist_rot = batch.hist_rot.repeat_interleave(k, dim=0)
        p_xyz, p_rot = space.action_to_traj(actions, hist_xyz, hist_rot)
        xyz[idx] = p_xyz.reshape(len(idx), k, w, 3).numpy()
        rot[idx] = p_rot.reshape(len(idx), k, w, 3, 3).numpy()
    return {"xyz": xyz, "rot": rot}


def cached_predictions(spec: str, cfg: EvalConfig, out: Path, key: str, compute) -> dict[str, np.ndarray]:
    path = out / "predictions" / f"{key}.npz"
    if path.is_file():
        log.info(f"reusing predictions of {spec} ({path.name})")
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    preds = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **preds)
    tmp.replace(path)
    return preds


def run(cfg: EvalConfig) -> dict:
    reader = StoreReader(cfg.store)
    store_cfg = ModelConfig.from_dict(reader.info.model_config)
    sample_ids = reader.select(cfg.split, list(cfg.camera_sets) or None)
    if not sample_ids:
        raise UserError(f"split {cfg.split!r} of {cfg.store} has no samples to evaluate (try --split all)")
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.dtype)
    out = default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dataset = CachedFeatures(cfg.store, sample_ids)
    models = {"baseline": resolve_init(cfg.baseline, reader)}
    for i, ckpt in enumerate(cfg.checkpoints):
        models[_model_name(ckpt, i)] = resolve_checkpoint(ckpt)
    predictions = {}
    for name, spec in models.items():
        key = model_key(spec, cfg, reader.info.fingerprint, sample_ids)
        predictions[name] = cached_predictions(
            spec, cfg, out, key, lambda spec=spec: predict(spec, cfg, dataset, store_cfg, device, dtype)
        )

    truth = [reader.read(s) for s in sample_ids]
    infos = reader.sample_infos()
    per_sample: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    bins = []
    for i, sample in enumerate(truth):
        kappa = (
            sample.action[:, 1].numpy() * store_cfg.action_space.curvature_std
            + store_cfg.action_space.curvature_mean
        )
        bins.append(M.curvature_bin(float(np.abs(kappa).max())))
        gt_xyz, gt_rot = sample.fut_xyz.numpy(), sample.fut_rot.numpy()
        for name, pred in predictions.items():
            per_sample[name].append(M.sample_metrics(pred["xyz"][i], pred["rot"][i], gt_xyz, gt_rot))

    results = summarise(cfg, models, per_sample, bins, [infos[s].camera_set for s in sample_ids])
    results["store"] = {
        "path": str(cfg.store),
        "fingerprint": reader.info.fingerprint,
        "prompt_mode": reader.info.prompt_mode,
    }
    results["config"] = json.loads(json.dumps(asdict(cfg), default=str))
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    _write_per_sample(out / "per_sample.csv", sample_ids, bins, infos, per_sample)
    plot_files: list[str] = []
    if cfg.plots:
        from alpamayo_cache import plots

        plot_files = plots.make_all(
            out, reader, sample_ids, truth, predictions, per_sample, bins, results, cfg.max_panels
        )
    from alpamayo_cache import report

    report.write(out / "report.md", results, plot_files)
    log.info(f"eval report: {out / 'report.md'}")
    results["out_dir"] = str(out)
    return results


def _model_name(spec: str, index: int) -> str:
    path = Path(spec)
    run_folder = run_folder_of(path)
    if run_folder is not None:
        return run_folder.name
    return path.stem if path.suffix else f"model{index + 1}"


def summarise(
    cfg: EvalConfig, models: dict[str, str], per_sample, bins: list[str], camera_sets: list[str]
) -> dict:
    results: dict = {
        "models": models,
        "conventions": _conventions(cfg),
        "overall": {},
        "by_curvature": {},
        "by_camera_set": {},
        "paired": {},
    }
    for name, rows in per_sample.items():
        results["overall"][name] = M.aggregate(rows)
        results["by_curvature"][name] = {
            b: M.aggregate([r for r, rb in zip(rows, bins, strict=True) if rb == b])
            for b in sorted(set(bins))
        }
        if len(set(camera_sets)) > 1:
            results["by_camera_set"][name] = {
                c: M.aggregate([r for r, rc in zip(rows, camera_sets, strict=True) if rc == c])
                for c in sorted(set(camera_sets))
            }
    base = per_sample["baseline"]
    for name, rows in per_sample.items():
        if name == "baseline":
            continue
        paired = {}
        for metric in KEY_METRICS:
            paired[metric] = M.paired_delta(
                [r[metric] for r in rows], [r[metric] for r in base], cfg.seed, cfg.bootstrap
            )
            for b in sorted(set(bins)):
                sel = [i for i, rb in enumerate(bins) if rb == b]
                paired[f"{metric}@{b}"] = M.paired_delta(
                    [rows[i][metric] for i in sel], [base[i][metric] for i in sel], cfg.seed, cfg.bootstrap
                )
        results["paired"][name] = paired
    return results


def _conventions(cfg: EvalConfig) -> dict[str, str]:
    return {
        "samples": f"K={cfg.num_samples} trajectories per sample, Euler {cfg.num_steps} steps, same initial noise for every model (seed {cfg.seed})",
        "min_ade": "best-of-K chosen by full 6.4 s XY ADE; by_t values are that sample's ADE over the first 0.5/1/3/5 s",
        "min_ade_reselect": "best-of-K re-chosen at each horizon",
        "ade": "sample 0 only",
        "corner_distance": "4x3x2 m box, min over K per time step and corner, then mean",
        "straight_line_bias": "lateral offset / heading change of the mean of K vs ground truth; turn = |GT heading change| > 15 deg",
        "curvature_bins": "max |GT curvature|: straight < 0.01, gentle < 0.05, sharp >= 0.05 1/m",
        "paired": "per-sample candidate - baseline; mean, bootstrap 95% CI, win rate = share of samples where the candidate is lower",
    }


def _write_per_sample(path: Path, sample_ids, bins, infos, per_sample) -> None:
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
