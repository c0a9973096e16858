"""The settings of every stage: one frozen dataclass per command, each field declared once.

The CLI, config files and ``--set`` are generated from these declarations (see ``options.py``);
``__post_init__`` checks ranges and combinations, so a bad value is refused before any work starts.
This module imports nothing heavy: ``alpamayo-cache --help`` builds from it instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpamayo_cache.errors import UserError
from alpamayo_cache.options import option

SYNTHETIC = "synthetic"
PROMPT_MODES = ("traj-only", "reasoning")
KV_DTYPES = ("bf16", "fp32", "fp8", "int8", "int4")
SCOPES = ("all", "heads", "lora", "vlm-top")
VLM_TRAIN_MODES = ("lora", "full")
VLM_EXPERT_MODES = ("all", "lora", "heads")
OBJECTIVES = ("fm", "awr")
# accelerate's tracker names (accelerate.utils.LoggerType); each needs its own package installed.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
DEVICE_HELP = "auto (CUDA if present) | cpu | cuda | cuda:N."


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> None:
    _check(value in allowed, f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class PrecomputeConfig:
    store: Path = option(Path("cache_store/tiny-traj-only"), help="Feature store to create or resume.")
    data: str = option(
        SYNTHETIC, help="Local PhysicalAI-AV folder or hub cache, own-clips folder, or 'synthetic'."
    )
    model: str = option(
        "tiny",
        help="Preset (tiny, tiny-1.5, tiny-2super, alpamayo-r1-10b, alpamayo-1.5-10b, alpamayo-2-super) or a "
        "local Alpamayo checkpoint folder (R1, 1.5 or 2 Super, read from its config.json).",
    )
    tokenizer: Path | None = option(
        None, help="Local tokenizer folder (real models; default: the model folder)."
    )
    prompt_mode: str = option("traj-only", help="traj-only | reasoning (chain-of-causation text first).")
    keyframes: str = option("default", help="default (t0 = 5.1 s) | max-curvature | stride:<seconds>.")
    camera_sets: tuple[str, ...] = option(
        ("default",),
        flag="--camera-set",
        help="default | front-only | cameras:<id>[+<id>] (1-7 cameras, ids 0-6) | mask:<cam>[+<cam>] (repeatable).",
    )
    route: str = option(
        "",
        help="Navigation routes for models that read one (1.5, 2 Super): a JSON map or CSV (clip_id,route) "
        "of clip id -> text, or 'synthetic' (the synthetic clips' routes). PhysicalAI-AV has no route field.",
    )
    clips_file: Path | None = option(None, flag="--clips", help="File with one clip id per line.")
    limit: int | None = option(None, help="Only the first N clips (pilot runs).")
    val_percent: int = option(10, help="Share of clips (by a hash of the clip id) held out as 'val'.")
    kv_dtype: str = option(
        "auto",
        help="K/V precision on disk: auto (the compute dtype) | bf16 | fp32 | fp8 | int8 | int4 (--dry-run compares sizes).",
    )
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="VLM compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32.")
    reader: str = option("auto", help="auto | devkit (hub cache) | folder (plain download folder).")
    revision: str | None = option(None, help="Dataset revision inside a hub cache (default: refs/main).")
    rank: int | None = option(
        None, help="This process's share of the clips (default: from torchrun/accelerate)."
    )
    world_size: int | None = option(None, help="Number of processes sharing the clips.")
    synthetic_clips: int = option(48, help="Clips the built-in synthetic dataset has (--data synthetic).")
    synthetic_dir: Path = option(
        Path("cache_store/synthetic-data"), help="Where the synthetic clips are written."
    )
    seed: int = option(0, help="Seed of the synthetic data and of reasoning sampling.")
    max_reasoning_tokens: int = option(32, help="Longest sampled reasoning (prompt mode 'reasoning').")
    max_ego_gap_s: float = option(0.35, help="Skip keyframes whose egomotion has a gap longer than this (s).")
    dry_run: bool = option(False, help="Print the plan (samples, bytes, free disk) and stop.")
    vlm_from_layer: int | None = option(
        None,
        help="Keep the hidden states entering VLM text layer k and the K/V of layers < k only, so "
        "train --train vlm-top can co-train layers k.. (must lie above the deepstack layers).",
    )
    disk_margin: float = option(0.95, help="Share of the free disk a plan may use.", cli=False)

    def __post_init__(self) -> None:
        _choice(self.prompt_mode, PROMPT_MODES, "--prompt-mode")
        _choice(self.kv_dtype, ("auto", *KV_DTYPES), "--kv-dtype")
        _choice(self.reader, ("auto", "devkit", "folder"), "--reader")
        _choice(self.dtype, ("auto", "bf16", "fp32"), "--dtype")
        _check(0 <= self.val_percent <= 100, "--val-percent must be between 0 and 100")
        _check(self.limit is None or self.limit >= 1, "--limit must be at least 1")
        _check(self.synthetic_clips >= 1, "--synthetic-clips must be at least 1")
        _check(self.max_reasoning_tokens >= 1, "--max-reasoning-tokens must be at least 1")
        _check(self.max_ego_gap_s > 0, "--max-ego-gap-s must be positive")
        _check(0 < self.disk_margin <= 1, "disk_margin must be in (0, 1]")
        _check(bool(self.camera_sets), "--camera-set needs at least one camera set")
        _check(self.vlm_from_layer is None or self.vlm_from_layer >= 0, "--vlm-from-layer must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    store: Path = option(
        Path("cache_store/tiny-traj-only"), positional=True, help="Feature store (precompute)."
    )
    run: str | None = option(None, help="Run name: output goes to runs/<name> (default: the store's name).")
    run_dir: Path | None = option(None, help="Output folder (overrides --run).")
    init: str = option(
        "auto", help="Starting weights: auto (the store's preset) | preset | released folder | run."
    )
    scope: str = option(
        "all",
        flag="--train",
        help="What trains: all (expert + projections) | heads | lora | vlm-top (the VLM's layers k.. of a "
        "--vlm-from-layer store, plus the expert as --vlm-expert says).",
    )
    objective: str = option(
        "fm",
        help="Training objective: fm (flow matching to the logged trajectory) | awr (fm plus advantage-"
        "weighted regression towards the best of K sampled trajectories, scored by the rewards).",
    )
    # awr (train/awr.py): K draws per sample with the eval sampler, scored; the best one is regressed on.
    awr_samples: int = option(4, help="awr: trajectories sampled per training sample (K).")
    awr_sample_steps: int = option(10, help="awr: Euler steps of the sampler.")
    awr_noise_growth: float = option(
        0.2, help="awr: initial noise of draw i (0-based) is scaled by 1 + growth * i."
    )
    awr_temperature: float = option(1.0, help="awr: weight = exp(advantage / temperature).")
    awr_max_weight: float = option(20.0, help="awr: the weight is clipped to at most this.")
    rl_loss_weight: float = option(0.5, help="awr: loss = fm loss + rl_loss_weight * awr loss.")
    reward_w_safety: float = option(1.5, help="awr: weight of visual safety in the reward.")
    reward_w_gt: float = option(0.5, help="awr: weight of similarity to the logged trajectory (x trust).")
    reward_w_reasoning: float = option(0.3, help="awr: weight of reasoning-trajectory agreement.")
    reward_w_comfort: float = option(0.0, help="awr: weight of ride comfort (jerk, lateral acceleration).")
    reward_safety_threshold: float = option(
        0.3, help="awr trust gate: the logged trajectory's visual safety below this (and a danger named)..."
    )
    reward_gt_trust_min: float = option(0.1, help="awr trust gate: ...drops its trust to this...")
    reward_gt_trust_max: float = option(1.0, help="awr trust gate: ...else its trust is this.")
    reward_gt_scale_m: float = option(1.0, help="awr: gt similarity = exp(-mean XY distance / scale) (m).")
    reward_danger_keywords: tuple[str, ...] = option(
        (), help="awr trust gate: words naming a danger (repeatable; default: mud, rock, obstacle, ...)."
    )
    route_dropout: float = option(
        0.0, help="Share of routed samples trained on their unguided prefix (no route), for guidance."
    )
    lora_rank: int = option(16, help="LoRA rank (--train lora).")
    lora_alpha: int = option(32, help="LoRA alpha (--train lora).")
    vlm_train: str = option("lora", help="--train vlm-top: the VLM's layers k.. train as lora | full.")
    vlm_expert: str = option(
        "all", help="--train vlm-top: the expert trains as all (full) | lora | heads (frozen expert)."
    )
    vlm_lr_scale: float = option(1.0, help="--train vlm-top: the VLM layers' learning rate is --lr x this.")
    split: str = option("train", help="Split trained on.")
    val_split: str = option("val", help="Split for the validation loss ('' for none).")
    camera_sets: tuple[str, ...] = option(
        (), flag="--camera-set", help="Only these camera sets (repeatable)."
    )
    steps: int = option(60, help="Optimizer steps of the whole run (the schedule spans them).")
    stop_after: int | None = option(None, help="End this invocation after N steps (resume later).")
    micro_batch: int = option(4, help="Samples per forward pass.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    lr: float | None = option(None, help="Peak learning rate (default 3e-3 tiny, 5e-5 real size).")
    min_lr_ratio: float = option(0.1, help="Cosine schedule floor, as a share of --lr.")
    warmup_steps: int = option(5, help="Linear warm-up steps.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas.", cli=False)
    grad_clip: float = option(1.0, help="Gradient-norm clip (0 disables).")
    optimizer: str = option("auto", help="auto (8-bit AdamW on CUDA when available) | adamw | adamw8bit.")
    checkpointing: str = option("auto", help="Gradient checkpointing: auto (on for CUDA) | on | off.")
    attention: str = option("", help="Action-token attention: '' (the model's) | bidirectional | causal.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32.")
    seed: int = option(0, help="Seed of batch order, noise and timesteps.")
    val_every: int = option(20, help="Validation loss every N steps.")
    save_every: int = option(20, help="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = option(
        2, help="Keep the newest N checkpoints (plus the best by validation loss)."
    )
    val_draws: int = option(4, help="Noise draws per validation sample.")
    num_workers: int = option(-1, help="Reader threads of the batch feed (-1: one per core, at most 4).")
    prefetch: int = option(
        -1, help="Batches read ahead of the step (-1: the plan's choice, 2 when RAM allows)."
    )
    draws_per_sample: int = option(
        1, help="Flow-matching (t, noise) draws per loaded prefix in one step (one K/V read, N targets)."
    )
    gpu_memory_gb: float = option(24.0, help="GPU memory the plan is checked against (GiB).")
    resume: bool = option(False, help="Continue the run in the run folder from its newest checkpoint.")
    resume_with_changes: bool = option(
        False, help="Allow --resume with changed settings (recorded in the run)."
    )
    overwrite: bool = option(False, help="Start the run folder over (only a folder this program made).")
    dry_run: bool = option(False, help="Print the memory and disk plan; refuse one that does not fit.")
    trackers: tuple[str, ...] = option(
        ("tensorboard",),
        flag="--tracker",
        help="Experiment trackers via accelerate, logging metrics.jsonl's numbers under <run>/tracking "
        "(tensorboard | wandb | mlflow | ...; repeatable); --set trackers= turns tracking off.",
    )
    model: str = option(
        "", help="With --dry-run: plan for this preset or checkpoint folder instead of a store's samples."
    )
    prefix_len: int | None = option(
        None, help="With --dry-run --model: prefix tokens per sample (default: estimated from the preset)."
    )

    def __post_init__(self) -> None:
        _choice(self.scope, SCOPES, "--train")
        _check(0 <= self.route_dropout <= 1, "--route-dropout must be between 0 and 1")
        _check(not self.model or self.dry_run, "--model plans without a store: it needs --dry-run")
        _check(self.prefix_len is None or self.prefix_len >= 1, "--prefix-len must be at least 1")
        for tracker in self.trackers:
            _choice(tracker, TRACKERS, "--tracker")
        _choice(self.vlm_train, VLM_TRAIN_MODES, "--vlm-train")
        _choice(self.vlm_expert, VLM_EXPERT_MODES, "--vlm-expert")
        _check(self.vlm_lr_scale > 0, "--vlm-lr-scale must be positive")
        _choice(self.objective, OBJECTIVES, "--objective")
        _choice(self.optimizer, ("auto", "adamw", "adamw8bit"), "--optimizer")
        _choice(self.checkpointing, ("auto", "on", "off"), "--checkpointing")
        _choice(self.attention, ("", "bidirectional", "causal"), "--attention")
        _choice(self.dtype, ("auto", "bf16", "fp32"), "--dtype")
        for name in (
            "steps",
            "micro_batch",
            "grad_accum",
            "val_every",
            "save_every",
            "val_draws",
            "lora_rank",
            "draws_per_sample",
        ):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        _check(self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
        _check(self.stop_after is None or self.stop_after >= 1, "--stop-after must be at least 1")
        _check(self.lr is None or self.lr > 0, "--lr must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be between 0 and 1")
        _check(
            self.warmup_steps >= 0 and self.weight_decay >= 0, "--warmup-steps/--weight-decay must be >= 0"
        )
        _check(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        _check(all(0 <= b < 1 for b in self.betas), "betas must lie in [0, 1)")
        _check(self.gpu_memory_gb > 0, "--gpu-memory-gb must be positive")
        self._check_awr()
        _check(
            not (self.resume and self.overwrite), "--resume and --overwrite contradict each other: pick one"
        )

    def _check_awr(self) -> None:
        _check(self.awr_samples >= 2, "--awr-samples must be at least 2 (AWR compares samples)")
        _check(self.awr_sample_steps >= 1, "--awr-sample-steps must be at least 1")
        _check(self.awr_noise_growth >= 0, "--awr-noise-growth must be >= 0")
        _check(self.awr_temperature > 0, "--awr-temperature must be positive")
        _check(self.awr_max_weight >= 1, "--awr-max-weight must be at least 1")
        _check(self.rl_loss_weight >= 0, "--rl-loss-weight must be >= 0")
        weights = (self.reward_w_safety, self.reward_w_gt, self.reward_w_reasoning, self.reward_w_comfort)
        _check(min(weights) >= 0, "--reward-w-* weights must be >= 0")
        _check(sum(weights) > 0, "--reward-w-* weights are all 0: give at least one a positive weight")
        _check(0 <= self.reward_safety_threshold <= 1, "--reward-safety-threshold must be in [0, 1]")
        _check(
            0 <= self.reward_gt_trust_min <= self.reward_gt_trust_max,
            "--reward-gt-trust-min must be >= 0 and <= --reward-gt-trust-max",
        )
        _check(self.reward_gt_scale_m > 0, "--reward-gt-scale-m must be positive (metres)")
        _check(
            all(k.replace("-", "").replace(" ", "").isalpha() for k in self.reward_danger_keywords),
            "--reward-danger-keywords must be words (letters, '-' or spaces)",
        )

    @property
    def output_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        return Path("runs") / (self.run or Path(self.store).name)


@dataclass(frozen=True)
class EvalConfig:
    store: Path = option(
        Path("cache_store/tiny-traj-only"), positional=True, help="Feature store (precompute)."
    )
    baseline: str = option("auto", help="auto (the store's preset) | preset | released Alpamayo-R1 folder.")
    checkpoints: tuple[str, ...] = option(
        (), flag="--checkpoint", help="Run folder or head file (repeatable)."
    )
    out_dir: Path | None = option(None, flag="--out", help="Report folder (default: <first run>/eval).")
    split: str = option("val", help="val | train | all.")
    camera_sets: tuple[str, ...] = option(
        (), flag="--camera-set", help="Only these camera sets (repeatable)."
    )
    num_samples: int = option(6, help="Trajectories per sample (best-of-K).")
    num_steps: int = option(10, help="Euler steps of the flow-matching sampler.")
    guidance: float | None = option(
        None,
        help="Classifier-free guidance weight w on routed samples: v = (1-w) v_uncond + w v_cond "
        "(1.5 uses 1.5; default off: the route-conditioned velocity alone).",
    )
    seed: int = option(0, help="Seed of the per-sample initial noise (the same for every model).")
    micro_batch: int = option(8, help="Samples per forward pass.")
    attention: str = option("", help="'' (the model's) | bidirectional | causal.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="auto | bf16 | fp32.")
    bootstrap: int = option(2000, help="Bootstrap resamples for the intervals.")
    plots: bool = option(True, help="Draw plots.")
    max_panels: int = option(8, help="Example panels in the report.")

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_steps", "micro_batch", "bootstrap"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        _check(self.max_panels >= 0, "--max-panels must be >= 0")
        _choice(self.split, ("val", "train", "all"), "--split")
        _choice(self.attention, ("", "bidirectional", "causal"), "--attention")
        _choice(self.dtype, ("auto", "bf16", "fp32"), "--dtype")


@dataclass(frozen=True)
class PipelineConfig:
    data: str = option(SYNTHETIC, help="Local PhysicalAI-AV folder, own-clips folder, or 'synthetic'.")
    model: str = option("tiny", help="Preset (tiny, tiny-1.5, tiny-2super, ...) or local Alpamayo folder.")
    tokenizer: Path | None = option(None, help="Local tokenizer folder (real models).")
    name: str | None = option(None, help="Names the store and the run (default <model>-<prompt mode>).")
    prompt_mode: str = option("traj-only", help="traj-only | reasoning.")
    keyframes: str | None = option(None, help="Default: stride:1 on synthetic clips, else default.")
    camera_sets: tuple[str, ...] = option(("default",), flag="--camera-set", help="Camera sets (repeatable).")
    route: str = option(
        "auto",
        help="auto (the synthetic routes for a model that reads routes on synthetic data, else none) | "
        "'' | route file | synthetic.",
    )
    route_dropout: float = option(0.2, help="Share of routed samples trained without their route.")
    guidance: float | None = option(
        None, help="Eval guidance weight (default: 1.5, the 1.5 notebook's, when samples have routes)."
    )
    limit: int | None = option(None, help="Only the first N clips.")
    steps: int = option(600, help="Training steps.")
    scope: str = option("all", flag="--train", help="all | heads | lora.")
    device: str = option("auto", help=DEVICE_HELP)
    pilot: bool = option(
        False, help="A first small run: 6 clips, one epoch (default name <model>-<prompt mode>-pilot)."
    )
    synthetic_clips: int = option(48, help="Clips the built-in synthetic dataset has (--data synthetic).")
    stores: Path = option(Path("cache_store"), help="Folder of stores.")
    runs: Path = option(Path("runs"), help="Folder of runs.")

    def __post_init__(self) -> None:
        _choice(self.prompt_mode, PROMPT_MODES, "--prompt-mode")
        _choice(self.scope, SCOPES, "--train")
        _check(
            self.scope != "vlm-top",
            "pipeline does not co-train the VLM: run precompute --vlm-from-layer K, then train --train vlm-top",
        )
        _check(self.steps >= 1, "--steps must be at least 1")
        _check(self.limit is None or self.limit >= 1, "--limit must be at least 1")


@dataclass(frozen=True)
class SynthConfig:
    out: Path = option(
        Path("cache_store/synthetic-data"), positional=True, help="Folder to write the clips into."
    )
    clips: int = option(48, help="Number of clips.")
    seed: int = option(0, help="Seed.")
    fault: tuple[str, ...] = option(
        (),
        help="Inject KIND=CLIP_INDEX; KIND: missing_camera, corrupt_video, short, nan_egomotion (repeatable).",
    )

    def __post_init__(self) -> None:
        _check(self.clips >= 1, "--clips must be at least 1")


@dataclass(frozen=True)
class StoreConfig:
    store: Path = option(Path("cache_store/tiny-traj-only"), positional=True, help="Feature store.")


@dataclass(frozen=True)
class ExportConfig:
    run: Path = option(
        Path("runs/tiny-traj-only"),
        positional=True,
        help="Training run folder (its newest intact checkpoint) or one checkpoint folder.",
    )
    to: Path | None = option(None, help="New (or empty) folder for the Alpamayo-R1 checkpoint.")
    base: str = option(
        "auto",
        help="auto (the run's starting weights) | a released Alpamayo-R1 folder: its untouched shards "
        "are reused, the changed tensors rewritten under their release names.",
    )
    link: bool = option(True, help="Hard-link untouched shards of the base folder (copy if that fails).")
    dtype: str = option("bf16", help="Tensor dtype of a whole-model (preset) export: bf16 | fp32.")
    shard_gb: float = option(5.0, help="Largest shard of a whole-model export (GB).")

    def __post_init__(self) -> None:
        _check(self.to is not None, "export needs --to <folder> for the checkpoint")
        _choice(self.dtype, ("bf16", "fp32"), "--dtype")
        _check(self.shard_gb > 0, "--shard-gb must be positive")
