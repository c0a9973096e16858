"""Routes and classifier-free guidance on cached prefixes (Alpamayo 1.5).

A routed sample's store entry holds its guided prefix (prompt with the route) and, from the first token
that differs on, its unguided one (the same prompt without the route, the same reasoning replayed on
top). The tokens before the route are identical in both prompts and, attention being causal, so are
their K/V, so they are stored once: bit for bit in the 1.5 release's own caches and on tiny-1.5
(tests/test_route_guidance.py); kernels that tile the two prompt lengths differently can leave float
rounding (9.5e-7 in fp32 on tiny-2super), which precompute records per sample
(``route_shared_kv_max_abs_diff`` in the sample's writer provenance).

- eval: v = (1 - w) v_uncond + w v_cond at every Euler step (``Policy.sample(..., uncond, guidance)``);
- train: each routed sample is shown without its route with probability ``route_dropout``, so one
  head learns both the guided and the unguided velocity (what guidance needs at inference).

Samples without a route have a single prefix: it serves as both.
"""

from __future__ import annotations

import hashlib

import torch

from alpamayo_cache.model.expert import Prefix


def _raw(x: torch.Tensor) -> torch.Tensor:
    """Byte view (every stored dtype, fp8 included, concatenates and pads the same way)."""
    return x.contiguous().view(torch.uint8)


def _stack(parts: list[torch.Tensor], longest: int, dtype: torch.dtype) -> torch.Tensor:
    """[l, h, L_i, d*itemsize] byte tensors -> [l, b, h, longest, d] in ``dtype``, right-padded."""
    layers, heads, _, width = parts[0].shape
    out = torch.zeros(layers, len(parts), heads, longest, width, dtype=torch.uint8)
    for i, p in enumerate(parts):
        out[:, i, :, : p.shape[2]] = p
    return out.view(dtype)


def unguided_prefix(batch) -> Prefix | None:
    """The batch's prefixes without their routes (a sample without a route keeps its own), on the CPU;
    None when no sample of the batch has a route."""
    if batch.uncond is None:
        return None
    if batch.key_mask is not None:
        raise ValueError("unguided prefixes are built from right-padded batches")
    keys, values, lengths, deltas = [], [], [], []
    for i, suffix in enumerate(batch.uncond):
        length = int(batch.lengths[i])
        k, v = _raw(batch.keys[:, i, :, :length]), _raw(batch.values[:, i, :, :length])
        if suffix is None:
            keys.append(k)
            values.append(v)
            lengths.append(length)
            deltas.append(int(batch.rope_deltas[i]))
            continue
        shared = suffix.route_start
        keys.append(torch.cat([k[:, :, :shared], _raw(suffix.keys)], dim=2))
        values.append(torch.cat([v[:, :, :shared], _raw(suffix.values)], dim=2))
        lengths.append(suffix.length)
        deltas.append(suffix.rope_delta)
    longest = max(lengths)
    return Prefix(
        keys=_stack(keys, longest, batch.keys.dtype),
        values=_stack(values, longest, batch.values.dtype),
        rope_deltas=torch.tensor(deltas),
        lengths=torch.tensor(lengths),
        kv_scale=batch.kv_scale,  # a suffix is encoded with its sample's scales
    )


def mix_prefixes(cond: Prefix, uncond: Prefix, use_uncond: torch.Tensor) -> Prefix:
    """Per sample, the unguided prefix where ``use_uncond`` [b] is True, else the guided one."""
    width = max(cond.width, uncond.width)

    def widen(x: torch.Tensor) -> torch.Tensor:
        raw = _raw(x)
        pad = torch.zeros(*raw.shape[:3], width - raw.shape[3], raw.shape[4], dtype=torch.uint8)
        return torch.cat([raw, pad.to(raw.device)], dim=3)

    pick = use_uncond.to(torch.bool)[None, :, None, None, None]
    keys = torch.where(pick, widen(uncond.keys), widen(cond.keys)).view(cond.keys.dtype)
    values = torch.where(pick, widen(uncond.values), widen(cond.values)).view(cond.values.dtype)
    return Prefix(
        keys=keys,
        values=values,
        rope_deltas=torch.where(use_uncond.bool(), uncond.rope_deltas, cond.rope_deltas),
        lengths=torch.where(use_uncond.bool(), uncond.lengths, cond.lengths),
        kv_scale=cond.kv_scale,
    )


def route_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The route-dropout draws of one micro-batch (separate from its noise draws, so a run without
    route dropout draws exactly what it drew before)."""
    digest = hashlib.sha256(f"route:{seed}:{epoch}:{batch_index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def training_prefix(batch, route_dropout: float, generator: torch.Generator) -> Prefix:
    """The prefix a training step sees: guided, except routed samples drawn (rate ``route_dropout``)
    to go without their route."""
    cond = Prefix.from_batch(batch)
    if route_dropout <= 0 or batch.uncond is None:
        return cond
    draws = torch.rand(len(batch.uncond), generator=generator) < route_dropout
    routed = torch.tensor([u is not None for u in batch.uncond])
    uncond = unguided_prefix(batch)
    assert uncond is not None
    return mix_prefixes(cond, uncond, draws & routed)
