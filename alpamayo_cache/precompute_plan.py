"""Precompute's plan: which clips and samples this rank makes, from which data (synthetic data is rendered
here), with which routes, and how many bytes each sample takes on this filesystem (checked against the
free disk before any work)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alpamayo_cache.config import CAMERA_IDS, ModelConfig
from alpamayo_cache.configs import SYNTHETIC, PrecomputeConfig
from alpamayo_cache.data.routes import SYNTHETIC_ROUTES, read_routes
from alpamayo_cache.data.samples import (
    SampleSpec,
    camera_id,
    camera_set,
    check_policy,
    plan_samples,
)
from alpamayo_cache.data.source import ClipSource, open_source
from alpamayo_cache.errors import UserError
from alpamayo_cache.runtime import (
    dist_rank,
    human_bytes,
    log,
)
from alpamayo_cache.store import format as F
from alpamayo_cache.store.quant import INT_BITS


@dataclass
class Plan:
    model: ModelConfig
    source: ClipSource
    clips: list[str]
    specs: list[SampleSpec]
    clip_failures: list[tuple[str, str]]
    todo: list[SampleSpec]
    bytes_per_sample: dict[str, int]  # by camera set
    prefix_lengths: dict[str, int]  # L by camera set (traj-only: exact; reasoning: its minimum)
    kv_dtype: str
    rank: int
    world: int
    routes: dict[str, str] = field(default_factory=dict)  # clip_id -> route text (models with a route)

    @property
    def expected_bytes(self) -> int:
        return sum(self.bytes_per_sample[s.camera_set] for s in self.todo)


def synthetic_cameras(cfg: PrecomputeConfig, model: ModelConfig) -> tuple[str, ...]:
    """The cameras the synthetic clips need: the model's and its camera sets', ordered by id."""
    wanted = {c for name in cfg.camera_sets for c in camera_set(name, model.cameras).cameras}
    return tuple(sorted(wanted | set(model.cameras), key=lambda c: CAMERA_IDS.get(c, len(CAMERA_IDS))))


def resolve_data(cfg: PrecomputeConfig, model: ModelConfig) -> Path:
    """The dataset folder; for synthetic data its snapshot (the folder may hold several: other camera
    lists or clip counts, and refs/main names only the last one written)."""
    if cfg.data != SYNTHETIC:
        return Path(cfg.data)
    from alpamayo_cache.data.synthetic import write_dataset

    log.info(
        f"synthetic data: {cfg.synthetic_clips} clips in {cfg.synthetic_dir} (rendered once, ~1 s per clip; "
        "then reused)"
    )
    cameras = synthetic_cameras(cfg, model)
    return write_dataset(cfg.synthetic_dir, n_clips=cfg.synthetic_clips, seed=cfg.seed, cameras=cameras)


def load_routes(cfg: PrecomputeConfig, model: ModelConfig, data: Path) -> dict[str, str]:
    """clip_id -> route for a model that reads routes (--route FILE, or 'synthetic'); {} without one."""
    if not cfg.route:
        return {}
    if model.route == "none":
        raise UserError(f"model {model.name} reads no route: drop --route, or use a 1.5 / 2 Super model")
    if cfg.route != SYNTHETIC:
        return read_routes(Path(cfg.route))
    if cfg.data != SYNTHETIC:
        raise UserError("--route synthetic needs --data synthetic: pass a route file for other data")
    return read_routes(data / SYNTHETIC_ROUTES)


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


def prompt_camera_ids(model: ModelConfig, cameras: tuple[str, ...]) -> list[int] | None:
    """The release camera ids a labelled prompt prints (None: the model's prompt has no labels)."""
    if not (model.camera_labels or model.frame_labels):
        return None
    return [camera_id(c) for c in cameras]


def expected_prefix_length(
    model: ModelConfig, camera_set_name: str, mode: str, tokenizer, route: str | None = None
) -> tuple[int, int]:
    """Prompt tokens L of one sample (exact for traj-only; reasoning adds its sampled text), and the
    tokens of its unguided suffix (0 without a route)."""
    from alpamayo_cache.model.prompt import PromptBuilder, tokens_per_image
    from alpamayo_cache.model.vlm import shared_length

    cameras = camera_set(camera_set_name, model.cameras).cameras
    per_image = [tokens_per_image(model)] * (len(cameras) * model.frames_per_camera)
    history = np.zeros((model.history_steps, 3), np.float32)
    builder = PromptBuilder(tokenizer, model)
    ids = builder.build(per_image, history, mode, prompt_camera_ids(model, cameras), route)
    extra = 0 if mode == "traj-only" else 1  # reasoning: at least <|traj_future_start|> follows
    if not route:
        return len(ids) + extra, 0
    plain = builder.build(per_image, history, mode, prompt_camera_ids(model, cameras))
    return len(ids) + extra, len(plain) - shared_length(ids, plain) + extra


def make_plan(cfg: PrecomputeConfig, model: ModelConfig, kv_dtype: str) -> Plan:
    rank, world = dist_rank()
    rank = cfg.rank if cfg.rank is not None else rank
    world = cfg.world_size if cfg.world_size is not None else world
    if not 0 <= rank < world:
        raise UserError(f"--rank {rank} must be in [0, --world-size {world})")
    for name in cfg.camera_sets:
        camera_set(name, model.cameras)  # bad names fail before any data is touched
    check_policy(cfg.keyframes)
    data = resolve_data(cfg, model)
    routes = load_routes(cfg, model, data)
    if routes and cfg.vlm_from_layer is not None:
        raise UserError(
            "--vlm-from-layer stores keep one prompt's hidden states and cannot carry a route's unguided "
            "prefix: drop --route or --vlm-from-layer"
        )
    if routes and kv_dtype in INT_BITS:
        raise UserError(
            f"--kv-dtype {kv_dtype} cannot store the unguided prefix of routed samples: use bf16, fp32 or "
            "fp8 with --route"
        )
    source = open_source(data, revision=cfg.revision, reader=cfg.reader)
    clips = select_clips(source.clip_ids(), cfg, rank, world)
    specs, clip_failures = plan_samples(
        source, model, clips, cfg.keyframes, list(cfg.camera_sets), cfg.val_percent
    )
    from alpamayo_cache.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        model, cfg.tokenizer or (Path(cfg.model) if Path(cfg.model).is_dir() else None)
    )
    t = model.text
    longest_route = max(routes.values(), key=len) if routes else None
    block = _block_size(Path(cfg.store))
    lengths, per_sample = {}, {}
    for name in cfg.camera_sets:
        length, suffix = expected_prefix_length(model, name, cfg.prompt_mode, tokenizer, longest_route)
        cameras = len(camera_set(name, model.cameras).cameras)
        lengths[name] = length
        per_sample[name] = F.sample_bytes(
            length,
            t.num_layers,
            t.num_kv_heads,
            t.head_dim,
            kv_dtype,
            t.hidden_size,
            cameras,
            block=block,
            vlm_from_layer=cfg.vlm_from_layer,
        ) + suffix * F.kv_bytes_per_token(t.num_layers, t.num_kv_heads, t.head_dim, kv_dtype)
    committed = set(F.committed_samples(cfg.store)) if Path(cfg.store).is_dir() else set()
    todo = [s for s in specs if s.sample_id not in committed]
    return Plan(
        model, source, clips, specs, clip_failures, todo, per_sample, lengths, kv_dtype, rank, world, routes
    )


def _existing(store: Path) -> Path:
    """The store, or the nearest folder above it that exists (what its disk is asked about)."""
    return store if store.exists() else next(p for p in store.parents if p.exists())


def _block_size(store: Path) -> int:
    return os.statvfs(_existing(store)).f_frsize or 4096


def kv_options_table(cfg: PrecomputeConfig, plan: Plan, model: ModelConfig, chosen: str, todo: int) -> str:
    """Bytes per sample and for the plan's samples under every --kv-dtype (quantisation error measured on
    synthetic real-size K/V, store/quant.py)."""
    error = {"bf16": "bf16 rounding", "fp32": "none", "fp8": "~2.7%", "int8": "~0.8%", "int4": "~7.8%"}
    t = model.text
    block = _block_size(Path(cfg.store))
    length = plan.prefix_lengths[cfg.camera_sets[0]]
    cameras = len(camera_set(cfg.camera_sets[0], model.cameras).cameras)
    rows = ["K/V options (camera set " + cfg.camera_sets[0] + f", L={length}):"]
    for dtype in F.KV_ITEMSIZE:
        one = F.sample_bytes(
            length, t.num_layers, t.num_kv_heads, t.head_dim, dtype, t.hidden_size, cameras, block=block
        )
        mark = "  <- this run" if dtype == chosen else ""
        rows.append(
            f"  {dtype:<5} {human_bytes(one):>10} per sample, {human_bytes(one * todo):>10} for {todo} "
            f"(relative error {error[dtype]}){mark}"
        )
    return "\n".join(rows)


def free_disk(store: Path) -> tuple[Path, int]:
    probe = _existing(store)
    return probe, shutil.disk_usage(probe).free
