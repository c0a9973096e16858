"""The differences between transformers 4.57 and 5.x that this package meets, in one place.

Each helper detects the installed API by what it offers (a parameter, an attribute), not by its
version string, so a point release that back-ports a change keeps working. Everything else the
package uses from transformers (Qwen3VLTextConfig/TextModel, Qwen3VLConfig/ForConditionalGeneration,
get_rope_index, generate) has the same signature in both majors.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def add_special_tokens(tok: Any, tokens: list[str]) -> None:
    """Append special tokens, keeping the ones already registered: 4.x calls the list
    ``additional_special_tokens``, 5.x ``extra_special_tokens`` (and renamed the keep-flag with it)."""
    params = inspect.signature(tok.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # 5.x
        tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:
        tok.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer of a returned ``past_key_values``: a ``DynamicCache`` with ``layers``
    (4.56+ and 5.x) or the older ``key_cache``/``value_cache`` lists."""
    if hasattr(cache, "layers"):
        return cache.layers[index].keys, cache.layers[index].values
    return cache.key_cache[index], cache.value_cache[index]


def cache_argument(layer: torch.nn.Module) -> str:
    """Name under which a decoder layer takes the KV cache: ``cache`` in 5.x (where ``past_key_values``
    is deprecated), ``past_key_values`` in 4.x."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def multimodal_inputs(vlm_model: torch.nn.Module, input_ids: torch.Tensor, image_token_id: int) -> dict:
    """Inputs that 5.x needs next to ``input_ids`` to place the image tokens in M-RoPE
    (``mm_token_type_ids``: 1 on image tokens, 0 on text, as its processor makes them); 4.x finds the image
    tokens by id itself and takes none. ``vlm_model``: the inner ``Qwen3VLModel``. Pass the result to
    ``get_rope_index`` and ``generate``."""
    if "mm_token_type_ids" not in inspect.signature(vlm_model.get_rope_index).parameters:
        return {}
    return {"mm_token_type_ids": (input_ids == image_token_id).long()}


def output_cache(out: Any) -> Any:
    """The cache a forward returned: ``out.cache`` in 5.x (reading ``past_key_values`` there warns),
    ``out.past_key_values`` in 4.x."""
    return out.cache if "cache" in out else out.past_key_values


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Re-draw every parameter from one generator seeded with ``seed``, module by module in name order:
    N(0, std) for linear, convolution and embedding weights, 1 for norm weights, 0 for biases.
    transformers' own random init draws in another order in 5.x than in 4.x (same distributions, other
    numbers), so a preset's 'seeded random weights' would depend on the installed version."""
    generator = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Embedding):
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        elif "Norm" in type(module).__name__ and isinstance(weight, torch.nn.Parameter):
            weight.fill_(1.0)
        else:
            continue
        if isinstance(bias, torch.nn.Parameter):
            bias.zero_()
        done.update(id(p) for p in (weight, bias) if p is not None)
    missed = [name for name, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"seeded_init does not know how to draw {missed[0]} ({len(missed)} in all)")


def causal_mask(
    config: Any, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> Any:
    """The attention mask a Qwen3-VL text model builds for a fresh (cache-less) forward over ``embeds``:
    4.x's ``create_causal_mask`` takes input_embeds, cache_position and past_key_values, 5.x's
    inputs_embeds and cache (no cache_position)."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = {
        "config": config,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    return create_causal_mask(**kwargs)


def cache_keyword(layer: Any) -> str:
    """The name under which a decoder layer takes its K/V cache: ``past_key_values`` (4.x) or ``cache``
    (5.x)."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"
