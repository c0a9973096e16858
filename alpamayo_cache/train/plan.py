"""The plan of a training run: memory of one step and disk of its checkpoints, from the model
dimensions and the options, with a verdict against the GPU memory the user has; and its throughput
(read probe vs compute, the active bound, samples/s, wall time: ``train/throughput.py``).

Memory of one step:

Terms (bytes):
- weights: every head parameter in the training dtype (bf16 on GPU), LoRA adapters in fp32;
- grads: one per trainable parameter, in its dtype;
- optimizer: AdamW's two moments, fp32 (8 B/param), or 8-bit (2 B/param) with bitsandbytes;
- kv batch: micro-batch x L x VLM layers x K,V x kv-heads x head_dim x itemsize (the stored precision: 2 B
  for bf16, 1 B for fp8, which is dequantised one layer at a time on the GPU);
- activations: what autograd keeps for backward (expert layers: 2 Super's expert depth is its own). Per
  expert layer and sample the big items are the
  concatenated [prefix ; action] K and V (2 x h x (L + w) x d), plus the w-token hidden states and
  MLP intermediates. With gradient checkpointing only each layer's input is kept, plus one layer
  being recomputed;
- overhead: CUDA context and allocator fragmentation (a fixed 1.0 GiB, measured order of magnitude);
- sampling (``--objective awr``): the no-grad draw of K trajectories before the training forward, K x w
  action tokens folded into one sequence over the one cached prefix, Euler steps one after another, so
  only one layer's working set is alive at a time: the concatenated [prefix ; K w tokens] K and V, their
  copies repeated to the query heads (transformers' SDPA path with a mask does that for GQA), the
  attention scores [h_q, K w, L + K w] in fp32 (the math kernel, the worst case), the K w tokens'
  hidden/q/k/v/o and MLP intermediates, and a dequantised copy of the layer's prefix K/V when the store
  is fp8. Counted on top of the activations although they are freed in between (conservative).
The awr training forward folds two draws (logged target, best sample): activations count 2 w tokens,
and under the draws' block mask each kept layer also holds K/V repeated to the query heads and the fp32
attention weights.


A ``--vlm-from-layer k`` store adds the VLM's layers k..N-1 (resident in the training dtype): their
LoRA adapters or full weights with grads and optimizer states under ``--train vlm-top``; the kv batch
holds k layers plus the prompt's hidden states; activations add the recomputed K/V of layers k..N-1
(the expert's inputs) and, when they train, each layer's checkpointed input plus one layer's forward and
backward being recomputed (SDPA's fused kernels: no [L, L] score matrix on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from alpamayo_cache.config import ModelConfig
from alpamayo_cache.errors import UserError
from alpamayo_cache.runtime import human_bytes
from alpamayo_cache.train.throughput import Throughput

GIB = 1024**3
CUDA_OVERHEAD = 1 * GIB  # only counted for CUDA plans


def head_parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of expert, action_in_proj, action_out_proj (no module is built)."""
    e, t = cfg.expert, cfg.text
    q = e.hidden_size * e.num_heads * e.head_dim
    kv = 2 * e.hidden_size * t.num_kv_heads * e.head_dim
    o = e.num_heads * e.head_dim * e.hidden_size
    mlp = 3 * e.hidden_size * e.intermediate_size
    norms = 2 * e.hidden_size + 2 * e.head_dim
    expert = cfg.expert_layers * (q + kv + o + mlp + norms) + e.hidden_size
    p = cfg.action_in_proj
    feats = p.num_fourier_feats * 3
    h = p.hidden_size
    mlp_in = (
        (feats * h + h) + (p.num_enc_layers - 1) * (h + h * h + h) + (h + h * e.hidden_size + e.hidden_size)
    )
    action_in = mlp_in + 2 * e.hidden_size
    action_out = e.hidden_size * 2 + 2
    return {"expert": expert, "action_in_proj": action_in, "action_out_proj": action_out}


def lora_parameter_count(cfg: ModelConfig, rank: int) -> int:
    e, t = cfg.expert, cfg.text
    shapes = [
        (e.hidden_size, e.num_heads * e.head_dim),
        (e.hidden_size, t.num_kv_heads * e.head_dim),
        (e.hidden_size, t.num_kv_heads * e.head_dim),
        (e.num_heads * e.head_dim, e.hidden_size),
        (e.hidden_size, e.intermediate_size),
        (e.hidden_size, e.intermediate_size),
        (e.intermediate_size, e.hidden_size),
    ]
    return cfg.expert_layers * sum(rank * (a + b) for a, b in shapes)


def vlm_layer_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of one VLM text decoder layer (attention with q/k norms, MLP, two RMSNorms)."""
    t = cfg.text
    attn = 2 * t.hidden_size * t.num_heads * t.head_dim + 2 * t.hidden_size * t.num_kv_heads * t.head_dim
    return attn + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size + 2 * t.head_dim


def vlm_top_trainable_count(cfg: ModelConfig, first: int, mode: str, rank: int) -> int:
    """Trainable parameters of ``--train vlm-top`` in the VLM layers first..N-1. The last layer only
    trains what reaches its K/V: input norm, k/v projections, k-norm (or LoRA on k/v)."""
    t = cfg.text
    d, qd, kvd, mlp = (
        t.hidden_size,
        t.num_heads * t.head_dim,
        t.num_kv_heads * t.head_dim,
        t.intermediate_size,
    )
    if mode == "full":
        last = d + 2 * d * kvd + t.head_dim
        return (t.num_layers - 1 - first) * vlm_layer_parameter_count(cfg) + last
    shapes = [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, mlp), (d, mlp), (mlp, d)]
    per_layer = sum(rank * (a + b) for a, b in shapes)
    return (t.num_layers - 1 - first) * per_layer + 2 * rank * (d + kvd)


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    grads: int
    optimizer: int
    kv_batch: int
    activations: int
    overhead: int
    sampling: int = 0  # awr: the no-grad K-trajectory draw (module docstring)

    @property
    def total(self) -> int:
        parts = (self.weights, self.grads, self.optimizer, self.kv_batch, self.activations, self.overhead)
        return sum(parts) + self.sampling

    def table(self) -> str:
        rows = [
            (k, getattr(self, k))
            for k in ("weights", "grads", "optimizer", "kv_batch", "activations", "sampling", "overhead")
            if k != "sampling" or self.sampling
        ]
        rows.append(("total", self.total))
        return "\n".join(f"  {name:<12} {human_bytes(value):>10}" for name, value in rows)


def plan(
    cfg: ModelConfig,
    prefix_len: int,
    micro_batch: int,
    scope: str = "all",
    optimizer: str = "adamw",
    checkpointing: bool = True,
    param_bytes: int = 2,
    lora_rank: int = 16,
    cuda: bool = True,
    kv_itemsize: int = 2,
    draws: int = 1,
    sample_draws: int = 0,
    vlm_from_layer: int | None = None,
    vlm_train: str = "lora",
    vlm_expert: str = "all",
) -> MemoryPlan:
    """Memory of one step. ``draws``: flow-matching draws folded into the training forward;
    ``sample_draws``: trajectories sampled (no grad) per sample before it (awr's K; 0 for fm);
    ``vlm_from_layer``: the store's --vlm-from-layer k (layers k.. run in every step)."""
    if scope == "vlm-top" and vlm_from_layer is None:
        raise ValueError("scope vlm-top needs vlm_from_layer")
    expert_plan = plan(
        cfg, prefix_len, micro_batch, vlm_expert if scope == "vlm-top" else scope, optimizer, checkpointing,
        param_bytes, lora_rank, cuda, kv_itemsize, draws, sample_draws,
    ) if vlm_from_layer is not None else None  # fmt: skip
    if expert_plan is not None:
        return _with_vlm_top(expert_plan, cfg, prefix_len, micro_batch, scope == "vlm-top", optimizer,
                             checkpointing, param_bytes, lora_rank, kv_itemsize, vlm_from_layer, vlm_train)  # fmt: skip
    weights, grads, optim = parameter_bytes(cfg, scope, optimizer, param_bytes, lora_rank)

    e, t = cfg.expert, cfg.text
    w = cfg.n_waypoints * draws  # action tokens of the training forward
    act_bytes = 2 if param_bytes == 2 else 4
    kv_batch = micro_batch * prefix_len * t.num_layers * 2 * t.num_kv_heads * t.head_dim * kv_itemsize
    hidden = micro_batch * w * e.hidden_size * act_bytes
    # Per layer kept for backward: cat'ed K and V, q/k/v/o of the w tokens, MLP gate/up/act, norms.
    concat_kv = 2 * micro_batch * t.num_kv_heads * (prefix_len + w) * t.head_dim * act_bytes
    attn_small = (
        micro_batch * w * (3 * e.num_heads * e.head_dim + 2 * t.num_kv_heads * e.head_dim) * act_bytes
    )
    mlp = micro_batch * w * 3 * e.intermediate_size * act_bytes
    per_layer = concat_kv + attn_small + mlp + 4 * hidden
    if draws > 1:  # a block mask: SDPA gets K/V repeated to the query heads and keeps fp32 weights
        per_layer += 2 * micro_batch * e.num_heads * (prefix_len + w) * e.head_dim * act_bytes
        per_layer += micro_batch * e.num_heads * w * (prefix_len + w) * 4
    # Even with a frozen expert ("heads"), gradients reach action_in_proj through every expert layer.
    if checkpointing:
        activations = cfg.expert_layers * hidden + per_layer
    else:
        activations = cfg.expert_layers * per_layer
    sampling = sampling_bytes(cfg, prefix_len, micro_batch, sample_draws, act_bytes, kv_itemsize)
    return MemoryPlan(weights, grads, optim, kv_batch, activations, CUDA_OVERHEAD if cuda else 0, sampling)


def parameter_bytes(
    cfg: ModelConfig, scope: str, optimizer: str, param_bytes: int, lora_rank: int
) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) of the head under ``scope``."""
    counts = head_parameter_count(cfg)
    total_params = sum(counts.values())
    if scope == "all":
        trainable = total_params
    elif scope == "heads":
        trainable = counts["action_in_proj"] + counts["action_out_proj"]
    elif scope == "lora":
        trainable = (
            lora_parameter_count(cfg, lora_rank) + counts["action_in_proj"] + counts["action_out_proj"]
        )
    else:
        raise ValueError(f"unknown scope {scope!r}")
    extra_lora = lora_parameter_count(cfg, lora_rank) * 4 if scope == "lora" else 0
    weights = total_params * param_bytes + extra_lora
    grad_bytes = 4 if scope == "lora" else param_bytes
    grads = trainable * grad_bytes
    optimizer_bytes = {"adamw": 8, "adamw8bit": 2}[optimizer]
    optim = trainable * optimizer_bytes
    return weights, grads, optim


def sampling_bytes(
    cfg: ModelConfig, prefix_len: int, micro_batch: int, draws: int, act_bytes: int, kv_itemsize: int
) -> int:
    """Peak of the no-grad draw of ``draws`` trajectories per sample (one layer alive; docstring)."""
    if draws <= 0:
        return 0
    e, t = cfg.expert, cfg.text
    b, n, span = micro_batch, draws * cfg.n_waypoints, prefix_len + draws * cfg.n_waypoints
    concat_kv = 2 * b * t.num_kv_heads * span * t.head_dim * act_bytes
    repeated_kv = 2 * b * e.num_heads * span * e.head_dim * act_bytes
    scores = b * e.num_heads * n * span * 4
    tokens = b * n * (4 * e.hidden_size + (2 * e.num_heads + 2 * t.num_kv_heads) * e.head_dim) * act_bytes
    mlp = b * n * 3 * e.intermediate_size * act_bytes
    dequantised = (
        2 * b * t.num_kv_heads * prefix_len * t.head_dim * act_bytes if kv_itemsize != act_bytes else 0
    )
    return concat_kv + repeated_kv + scores + tokens + mlp + dequantised


def _with_vlm_top(
    base: MemoryPlan,
    cfg: ModelConfig,
    prefix_len: int,
    micro_batch: int,
    training: bool,
    optimizer: str,
    checkpointing: bool,
    param_bytes: int,
    lora_rank: int,
    kv_itemsize: int,
    first: int,
    mode: str,
) -> MemoryPlan:
    """``base`` (the expert's plan over a full store) with the VLM's layers first..N-1 added."""
    t = cfg.text
    b, L, n_top = micro_batch, prefix_len, t.num_layers - first
    act = 2 if param_bytes == 2 else 4
    weights, grads, optim = (
        base.weights + n_top * vlm_layer_parameter_count(cfg) * param_bytes,
        base.grads,
        base.optimizer,
    )
    if training:
        trainable = vlm_top_trainable_count(cfg, first, mode, lora_rank)
        weights += trainable * 4 if mode == "lora" else 0  # adapters in fp32
        grads += trainable * (4 if mode == "lora" else param_bytes)
        optim += trainable * {"adamw": 8, "adamw8bit": 2}[optimizer]
    token_kv = 2 * t.num_kv_heads * t.head_dim  # K and V values of one layer and token
    kv_batch = (
        b * L * (first * token_kv * kv_itemsize + t.hidden_size * (4 if kv_itemsize == 4 else 2) + 3 * 4)
    )
    fresh_kv = b * L * n_top * token_kv * act  # the expert's inputs for layers first..
    qd, mlp = t.num_heads * t.head_dim, t.intermediate_size
    one_layer = b * L * (6 * t.hidden_size + 4 * qd + 2 * token_kv + 4 * mlp) * act
    if not training:
        vlm_act = fresh_kv + one_layer  # no autograd graph: one layer alive at a time
    elif checkpointing:
        vlm_act = 2 * fresh_kv + n_top * b * L * t.hidden_size * act + 2 * one_layer  # K/V and their grads
    else:
        vlm_act = 2 * fresh_kv + n_top * one_layer
    return MemoryPlan(weights, grads, optim, kv_batch, base.activations + vlm_act, base.overhead)


@dataclass(frozen=True)
class TrainPlan:
    """Memory of one step and disk of the run's checkpoints, with what they were computed for."""

    memory: MemoryPlan
    checkpoint_bytes: int  # one checkpoint: head file + trainer state (trainable copy + optimizer)
    peak_disk_bytes: int  # kept checkpoints + the best + the one being written
    where: str  # "GPU" or "CPU RAM"
    summary: str
    throughput: Throughput | None = None

    @property
    def prefetch(self) -> int | None:
        """Batches the feed reads ahead (None: the feed's default)."""
        return None if self.throughput is None else self.throughput.prefetch

    def describe(self, budget_gb: float) -> str:
        fits = self.memory.total <= budget_gb * GIB
        verdict = (
            f"fits {budget_gb:g} GiB ({human_bytes(self.memory.total)})"
            if fits
            else f"does NOT fit {budget_gb:g} GiB ({human_bytes(self.memory.total)})"
        )
        return (
            f"plan ({self.summary}):\n{self.memory.table()}\n"
            f"  verdict: {self.where} memory {verdict}\n"
            f"  disk: {human_bytes(self.checkpoint_bytes)} per checkpoint, {human_bytes(self.peak_disk_bytes)} peak"
            + ("" if self.throughput is None else "\n" + self.throughput.describe())
        )


def plan_for(
    train_cfg,
    model: ModelConfig,
    prefix_len: int,
    device: str,
    optimizer: str,
    checkpointing: bool,
    kv_dtype: str,
    throughput: Throughput | None = None,
    vlm_from_layer: int | None = None,
) -> TrainPlan:
    """The plan of ``train_cfg`` (a TrainConfig) on ``device`` for prefixes of ``prefix_len`` tokens
    (``vlm_from_layer``: the store's --vlm-from-layer k, whose layers k.. run in every step)."""
    scope = train_cfg.scope
    if scope == "vlm-top" and vlm_from_layer is None:
        raise UserError(
            f"--train vlm-top needs a store made with --vlm-from-layer K; {train_cfg.store} holds every layer's K/V"
        )
    cuda = device.startswith("cuda")
    param_bytes = 2 if cuda or train_cfg.dtype == "bf16" else 4
    kv_itemsize = {"bf16": 2, "fp32": 4, "fp8": 1, "int8": 1, "int4": 1}.get(kv_dtype, 2)
    awr = getattr(train_cfg, "objective", "fm") == "awr"  # + the logged target and K sampled draws
    vlm_train, vlm_expert = getattr(train_cfg, "vlm_train", "lora"), getattr(train_cfg, "vlm_expert", "all")
    mem = plan(
        model, prefix_len, train_cfg.micro_batch, scope, optimizer, checkpointing,
        param_bytes=param_bytes, lora_rank=train_cfg.lora_rank, cuda=cuda, kv_itemsize=kv_itemsize,
        draws=2 if awr else 1, sample_draws=train_cfg.awr_samples if awr else 0,
        vlm_from_layer=vlm_from_layer, vlm_train=vlm_train, vlm_expert=vlm_expert,
    )  # fmt: skip
    counts = head_parameter_count(model)
    groups = {"all": sum(counts.values()), "heads": counts["action_in_proj"] + counts["action_out_proj"]}
    head_params = groups.get(scope, sum(counts.values()))  # lora exports merged full weights
    trainable_bytes = mem.grads if scope != "lora" else lora_parameter_count(model, train_cfg.lora_rank) * 4
    if scope == "vlm-top":  # + the merged VLM layers' file
        head_params += (model.text.num_layers - vlm_from_layer) * vlm_layer_parameter_count(model)  # type: ignore[operator]
    one = head_params * param_bytes + trainable_bytes + mem.optimizer
    top = (
        f", VLM layers {vlm_from_layer}.. {vlm_train if scope == 'vlm-top' else 'frozen'}"
        if vlm_from_layer is not None
        else ""
    )
    what = f"vlm-top (expert {vlm_expert})" if scope == "vlm-top" else scope
    summary = (
        f"{model.name}, L={prefix_len}, micro-batch {train_cfg.micro_batch}, {what}{top}, {optimizer}, "
        f"checkpointing {'on' if checkpointing else 'off'}, K/V {kv_dtype}"
        + (f", awr K={train_cfg.awr_samples}" if awr else "")
    )
    where = "GPU" if cuda else "CPU RAM"
    return TrainPlan(mem, one, one * (train_cfg.keep_checkpoints + 2), where, summary, throughput)
