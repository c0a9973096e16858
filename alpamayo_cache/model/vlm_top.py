"""The VLM's top text layers k..N-1, run again from a ``--vlm-from-layer k`` store so they can train.

A store made with ``precompute --vlm-from-layer k`` keeps the K/V of layers < k (they never change) and
the hidden states entering layer k. ``VLMTop`` holds the decoder layers k..N-1 (transformers'
``Qwen3VLTextDecoderLayer``, weights from the store's preset or release folder, or a co-trained run)
and turns those hidden states back into their K/V (post k-norm, post-RoPE), with gradients when
training. The same causal mask and rotary embedding as the VLM's own forward are built by transformers'
functions, and each layer's K/V are taken the way transformers' cache receives them, so with untouched
weights the recomputed K/V equal the full forward's (bitwise in fp32; tests/test_vlm_top.py).

Only the K/V of the last layer matter to the expert (nothing else crosses), so layer N-1 runs only its
input norm, k/v projections, k-norm and RoPE; its other weights are kept (for export) but frozen.

``CoTrainedPolicy`` is the Policy with ``vlm`` (a VLMTop) inside it, so accelerate/DDP wrap, sync and
checkpoint the VLM layers with the expert. Its state-dict names are ``vlm.layers.<i>.*``; on disk they
use the release's ``vlm.model.language_model.layers.<i>.*`` (``release_state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alpamayo_cache.config import ModelConfig, resolve_model
from alpamayo_cache.errors import UserError
from alpamayo_cache.model.expert import Prefix, PromptStates, hf_text_config
from alpamayo_cache.model.hf_compat import cache_keyword, causal_mask
from alpamayo_cache.model.policy import Policy

# Key prefix of the VLM's text layers in a released Alpamayo-R1 checkpoint.
RELEASE_LAYERS = "vlm.model.language_model.layers."
RELEASE_TEXT = "vlm.model.language_model."
# The co-trained layers' file inside a run checkpoint, next to head.safetensors.
VLM_LAYERS = "vlm_layers.safetensors"
# The last layer's weights that do not reach its K/V (frozen: they would get no gradient).
_LAST_LAYER_UNUSED = (
    "self_attn.q_proj",
    "self_attn.q_norm",
    "self_attn.o_proj",
    "mlp",
    "post_attention_layernorm",
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_first_layer(cfg: ModelConfig, first: int) -> None:
    """k must lie above the text layers that receive deepstack visual features (0..len-1) and below N."""
    n_deep, n = len(cfg.vision.deepstack_layers), cfg.text.num_layers
    if not n_deep <= first < n:
        raise UserError(
            f"--vlm-from-layer {first}: {cfg.name} adds deepstack visual features to text layers 0..{n_deep - 1} "
            f"and has {n} layers; pick k in {n_deep}..{n - 1}"
        )


def layer_index(release_key: str) -> int | None:
    """i of ``vlm.model.language_model.layers.<i>.*``, else None."""
    if not release_key.startswith(RELEASE_LAYERS):
        return None
    head = release_key[len(RELEASE_LAYERS) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class _Capture:
    """Duck-typed transformers cache: keeps what attention hands an empty cache (post k-norm,
    post-RoPE K/V) and returns it unchanged, as an empty DynamicCache would."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        # Extra arguments (4.x: cache_kwargs; 5.x: kwargs=...) carry nothing a capture needs.
        self.key, self.value = key, value
        return key, value


def _layer_and_kv(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, ...]:
    capture = _Capture()
    out = layer(hidden, **{cache_keyword(layer): capture}, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out, capture.key, capture.value  # type: ignore[return-value]


def _kv_only(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """K/V of a layer without its attention and MLP: the same ops, in the same order, as its attention."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    key = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    return key, value


class VLMTop(nn.Module):
    """Text decoder layers ``first``..N-1 of the VLM (state-dict names ``layers.<i>.*``)."""

    def __init__(self, cfg: ModelConfig, first: int, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            Qwen3VLTextDecoderLayer,
            Qwen3VLTextRotaryEmbedding,
        )

        check_first_layer(cfg, first)
        self.first, self.count = first, cfg.text.num_layers
        self.config = hf_text_config(cfg.text)
        with torch.device("meta"):  # no init work: every weight comes from ``tensors``
            self.layers = nn.ModuleDict(
                {str(i): Qwen3VLTextDecoderLayer(self.config, i) for i in range(first, self.count)}
            )
        expected = {f"layers.{k}": v for k, v in self.layers.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            what, keys = ("missing", missing) if missing else ("unexpected", unexpected)
            raise UserError(f"VLM layers {first}..: {what} weight {keys[0]} ({len(keys)} in all)")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise UserError(
                    f"VLM weight {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
                )
        self.load_state_dict(tensors, strict=False, assign=True)
        self.rotary_emb = Qwen3VLTextRotaryEmbedding(self.config)

    def kv(
        self, prompt: PromptStates, checkpointing: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V [b, h, t, d] of layers first..N-1 from the hidden states entering layer ``first``."""
        dtype = self.layers[str(self.first)].input_layernorm.weight.dtype
        hidden = prompt.hidden.to(dtype)
        positions = prompt.position_ids.long()  # [3, b, t]
        b, t = hidden.shape[:2]
        mask2d = prompt.mask if prompt.mask is not None else torch.ones(b, t, dtype=torch.long)
        cache_position = torch.arange(t, device=hidden.device)
        # The mask and rotary embedding the VLM's text model builds for its own forward. Right-padded
        # prompts need no padding mask: causal attention never lets a real token see the padding after it.
        mask = causal_mask(self.config, hidden, mask2d.to(hidden.device), positions[0])
        kwargs = dict(
            attention_mask=mask,
            position_ids=positions[0],
            cache_position=cache_position,
            position_embeddings=self.rotary_emb(hidden, positions),
        )
        out = []
        for i in range(self.first, self.count):
            run = _kv_only if i == self.count - 1 else _layer_and_kv
            layer = self.layers[str(i)]
            if checkpointing and torch.is_grad_enabled():
                result = checkpoint(run, layer, hidden, kwargs, use_reentrant=False)
            else:
                result = run(layer, hidden, kwargs)
            if run is _layer_and_kv:
                hidden = result[0]
            out.append((result[-2], result[-1]))
        return out

    def release_state(self) -> dict[str, torch.Tensor]:
        """Weights under the release's names (``vlm.model.language_model.layers.<i>.*``), LoRA merged
        into copies (the live weights are never touched, so training continues exactly)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.layers.state_dict().items():
            if "lora_" not in key:
                out[f"{RELEASE_LAYERS}{key.replace('.base_layer.', '.')}"] = value.detach().cpu().clone()
        for name, module in self.layers.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
                with torch.no_grad():
                    merged = module.base_layer.weight.detach().clone()
                    for adapter in module.active_adapters:
                        merged += module.get_delta_weight(adapter).to(merged.dtype)
                out[f"{RELEASE_LAYERS}{name}.weight"] = merged.cpu()
        return out


def make_trainable(top: VLMTop, mode: str, rank: int, alpha: int, seed: int) -> None:
    """``full``: every weight that reaches a K/V trains; ``lora``: adapters on those projections."""
    last = str(top.count - 1)

    def unused(name: str) -> bool:
        return name.startswith(f"{last}.") and any(
            f".{u}" in f".{name[len(last) + 1 :]}" for u in _LAST_LAYER_UNUSED
        )

    if mode == "full":
        for name, p in top.layers.named_parameters():
            p.requires_grad_(not unused(name))
        return
    from peft import LoraConfig, inject_adapter_in_model

    targets = [
        f"layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
        for i in range(top.first, top.count)
        for t in LORA_TARGETS
    ]
    targets = [t for t in targets if not unused(t[len("layers.") :])]
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)  # not the expert's LoRA seed: different adapters start differently
        inject_adapter_in_model(lora, top)
    for name, p in top.named_parameters():
        p.requires_grad_("lora_" in name)


@dataclass
class RecomputedPrefix(Prefix):
    """A prefix whose layers >= ``len(keys)`` come from ``fresh`` (recomputed, possibly with grads)."""

    fresh: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def layer(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self.keys.shape[0]
        if index < stored:
            return super().layer(index, dtype)
        key, value = self.fresh[index - stored]
        return key.to(dtype), value.to(dtype)


class CoTrainedPolicy(Policy):
    """A Policy that first runs the VLM's top layers over the prompt (module ``vlm``)."""

    def __init__(self, base: Policy, top: VLMTop) -> None:
        nn.Module.__init__(self)  # adopts ``base``'s modules instead of building new ones
        self.cfg, self.attention = base.cfg, base.attention
        self.expert, self.action_in_proj, self.action_out_proj = (
            base.expert,
            base.action_in_proj,
            base.action_out_proj,
        )
        self.gradient_checkpointing = base.gradient_checkpointing
        self.vlm = top

    def complete(self, prefix: Prefix) -> RecomputedPrefix:
        if prefix.prompt is None:
            raise UserError("a VLM-top model needs a store made with --vlm-from-layer (prompt hidden states)")
        if prefix.keys.shape[0] != self.vlm.first:
            raise UserError(
                f"the store keeps VLM layers 0..{prefix.keys.shape[0] - 1}, the model recomputes from layer "
                f"{self.vlm.first}: use a store made with --vlm-from-layer {self.vlm.first}"
            )
        fresh = self.vlm.kv(prefix.prompt, self.gradient_checkpointing and self.training)
        stored = {f.name: getattr(prefix, f.name) for f in fields(Prefix)}
        return RecomputedPrefix(**stored, fresh=fresh)

    def forward(self, prefix: Prefix, action, timesteps, noise, weights=None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.complete(prefix), action, timesteps, noise, weights)

    @torch.no_grad()
    def sample(self, prefix: Prefix, noise: torch.Tensor, num_steps: int = 10, uncond=None, guidance=None):
        if uncond is not None:  # precompute refuses routes on --vlm-from-layer stores
            raise UserError("a VLM-top model samples without guidance: its store holds no unguided prefix")
        return super().sample(self.complete(prefix), noise, num_steps)  # layers run once, not per step


# -- where the layers' weights come from --------------------------------------------------------------


def _preset_tensors(cfg: ModelConfig, first: int) -> dict[str, torch.Tensor]:
    """Layers first.. of the preset's seeded VLM, built exactly as precompute builds it."""
    from alpamayo_cache.model.vlm import build_vlm

    ids = {t: 0 for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    # Token ids do not touch the weights: the seeded construction only depends on the dimensions.
    vlm = build_vlm(cfg, ids, None, torch.float32, "cpu")
    state = vlm.model.language_model.state_dict()
    return {k: v for k, v in state.items() if k.startswith("layers.") and int(k.split(".")[1]) >= first}


def _folder_tensors(folder: Path, first: int) -> dict[str, torch.Tensor]:
    from alpamayo_cache.model.weights import read_tensors

    def wanted(key: str) -> bool:
        i = layer_index(key)
        return i is not None and i >= first

    return read_tensors(folder, wanted, strip=RELEASE_TEXT)


def _file_tensors(path: Path, first: int, identity: str) -> dict[str, torch.Tensor]:
    from alpamayo_cache.model.weights import load_head_file

    tensors, meta = load_head_file(path)
    if meta.get("first_layer") != first or meta.get("vlm_identity") != identity:
        raise UserError(
            f"{path} holds VLM layers from {meta.get('first_layer')} of {meta.get('vlm_identity')}; the store "
            f"recomputes from layer {first} of {identity}: use a run trained on a store of that VLM and k"
        )
    return {k[len(RELEASE_TEXT) :]: v for k, v in tensors.items()}


def load_top(source: str, info: Any, store_cfg: ModelConfig) -> tuple[VLMTop, str]:
    """The VLM layers a model evaluated or trained on the store ``info`` needs, and where they came
    from. ``source``: a run's head file (its trained layers, or its base's), a preset, or a release
    folder; the VLM must be the one that made the store."""
    from alpamayo_cache.model.vlm import model_identity

    first, identity = info.vlm_from_layer, info.model_identity
    path = Path(source)
    if path.is_file():
        if (path.parent / VLM_LAYERS).is_file():
            return VLMTop(store_cfg, first, _file_tensors(path.parent / VLM_LAYERS, first, identity)), str(
                path.parent / VLM_LAYERS
            )
        from alpamayo_cache.model.weights import load_head_file

        _, meta = load_head_file(path)
        return load_top(str(meta.get("base", store_cfg.name)), info, store_cfg)
    cfg = resolve_model(source)
    theirs = model_identity(cfg, path if path.is_dir() else None)
    if theirs != identity:
        raise UserError(
            f"the store was made by VLM {identity}; {source} is {theirs}: take the VLM layers from the preset "
            "or folder the store was made with (--init / --baseline)"
        )
    tensors = _folder_tensors(path, first) if path.is_dir() else _preset_tensors(store_cfg, first)
    return VLMTop(store_cfg, first, tensors), source


def attach(policy: Policy, source: str, info: Any, store_cfg: ModelConfig) -> Policy:
    """``policy`` as it must run on ``info``'s store: unchanged for a full store, else wrapped with the
    VLM's top layers (frozen) from ``source``. A co-trained run on a full store is refused: that
    store's K/V come from the VLM before training, so the run's own layers would be ignored."""
    if getattr(info, "vlm_from_layer", None) is None:
        if Path(source).is_file() and (Path(source).parent / VLM_LAYERS).is_file():
            raise UserError(
                f"{source} co-trained the VLM's top layers: use it on a store made with --vlm-from-layer "
                "(its layers recompute the K/V there), not on a store of the untrained VLM's K/V"
            )
        return policy
    top, _ = load_top(source, info, store_cfg)
    top.requires_grad_(False)
    return CoTrainedPolicy(policy, top)
