"""The training feed: the run's batch order from any resume point, state advancing on take, ring slots
kept intact while the loop holds them, damage raised at its batch, reads overlapping a slow step, and
the plan's throughput model."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.store import format as F
from alpamayo_cache.store.dataset import CachedFeatures, rank_batches
from alpamayo_cache.store.reader import CorruptSample, StoreReader
from alpamayo_cache.train import loop, run
from alpamayo_cache.train.checkpoints import TrainState
from alpamayo_cache.train.feed import Feed
from alpamayo_cache.train.throughput import COMPUTE_S_PER_SAMPLE, probe_read


def _dataset(store) -> CachedFeatures:
    reader = StoreReader(store)
    return CachedFeatures(store, reader.select("train"), reader)


def _expected(dataset: CachedFeatures, cfg: TrainConfig, epochs: int) -> list[tuple[int, int, list[str]]]:
    out = []
    for epoch in range(epochs):
        for index, idx in rank_batches(dataset.lengths, cfg.micro_batch, cfg.seed, epoch, 0, 1):
            out.append((epoch, index, [dataset.sample_ids[i] for i in idx]))
    return out


def test_order_state_and_resume(tiny_store):
    dataset = _dataset(tiny_store)
    cfg = TrainConfig(store=tiny_store, micro_batch=4, seed=3)
    expected = _expected(dataset, cfg, epochs=3)
    per_epoch = len(rank_batches(dataset.lengths, 4, 3, 0, 0, 1))
    state = TrainState()
    taken, states = [], []
    with Feed(dataset, cfg, state, 0, 1, prefetch=2) as feed:
        for _ in range(len(expected)):
            epoch, index, batch = next(feed)
            taken.append((epoch, index, list(batch.sample_ids)))
            states.append((state.epoch, state.batch_in_epoch))
            assert batch.keys.shape[1] == len(batch.sample_ids) and batch.slot is not None
    assert taken == expected
    assert states[per_epoch - 1] == (0, per_epoch)  # the epoch's last batch taken; nothing of the next
    assert states[per_epoch] == (1, 1)
    for start in (1, per_epoch - 1, per_epoch, per_epoch + 2):  # resume anywhere, epoch ends included
        epoch, position = states[start - 1]
        resumed = TrainState(epoch=epoch, batch_in_epoch=position)
        with Feed(dataset, cfg, resumed, 0, 1, prefetch=1) as feed:
            again = [(e, i, list(b.sample_ids)) for e, i, b in (next(feed) for _ in range(3))]
        assert again == expected[start : start + 3]


def test_a_held_batch_is_not_overwritten(tiny_store):
    dataset = _dataset(tiny_store)
    cfg = TrainConfig(store=tiny_store, micro_batch=4)
    with Feed(dataset, cfg, TrainState(), 0, 1, prefetch=2) as feed:
        _, _, first = next(feed)
        snapshot = first.keys.clone(), first.action.clone()
        deadline = time.time() + 30
        while feed._ready.qsize() < 2 and time.time() < deadline:  # the reader is as far ahead as it may go
            time.sleep(0.01)
        assert feed._ready.qsize() == 2
        assert torch.equal(first.keys, snapshot[0]) and torch.equal(first.action, snapshot[1])
        slots = {first.slot} | {next(feed)[2].slot for _ in range(2)}
        assert slots == {0, 1, 2}  # prefetch 2 + the held batch: three slots in turn


def test_damage_is_raised_at_its_batch(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    dataset = _dataset(store)
    cfg = TrainConfig(store=store, micro_batch=4)
    expected = _expected(dataset, cfg, epochs=1)
    bad = expected[2][2][1]  # a sample of the third batch
    (store / F.SAMPLES_DIR / bad / F.KV / "c.0.0.0.0.0").unlink()
    with Feed(dataset, cfg, TrainState(), 0, 1, prefetch=3) as feed:
        assert [next(feed)[2].sample_ids for _ in range(2)] == [e[2] for e in expected[:2]]
        with pytest.raises(CorruptSample, match=f"sample {bad}: kv chunk c.0.0.0.0.0 is missing"):
            next(feed)


class _SlowStep:
    """The fm objective plus a sleep: a step that is slower than the (also slowed) read."""

    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def loss(self, *args):
        time.sleep(self.seconds)
        return self.inner.loss(*args)


def test_prefetch_overlaps_a_slow_step(tiny_store, tmp_path, monkeypatch):
    """Read 0.4 s per batch, step 0.5 s + compute: read synchronously the loop would wait >= 0.4 / (0.9 + the
    tiny step's compute) of each step, over 10% until compute took 2.6 s (it takes ~0.01-1 s here)."""
    real_read, real_objective = CachedFeatures.read_batch, loop.make_objective

    def slow_read(self, reader, indices):
        time.sleep(0.4)
        return real_read(self, reader, indices)

    monkeypatch.setattr(CachedFeatures, "read_batch", slow_read)
    monkeypatch.setattr(loop, "make_objective", lambda cfg: _SlowStep(real_objective(cfg), 0.5))
    cfg = TrainConfig(store=tiny_store, run_dir=tmp_path / "run", steps=5, device="cpu", val_split="")
    result = run(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all("data_wait_s" in r and "step_s" in r for r in lines)
    waited = sum(r["data_wait_s"] for r in lines[1:])
    assert waited < 0.1 * sum(r["step_s"] for r in lines[1:]), [r["data_wait_s"] for r in lines]
    # The run summary's share counts the first step too, whose batch cannot be read ahead of the run.
    assert 0 <= result.data_wait_share < 0.1 + lines[0]["data_wait_s"] / sum(r["step_s"] for r in lines)


def test_plan_prints_the_throughput_model(tiny_store, tmp_path, caplog):
    import logging

    sample = StoreReader(tiny_store).sample_dir(StoreReader(tiny_store).select("train")[0])
    nbytes, seconds = probe_read(sample)
    files = [p for p in sample.rglob("c.*") if p.parent.name not in (F.THUMBS, F.FRONT_IMAGE)]
    assert nbytes == sum(p.stat().st_size for p in files) and 0 < seconds < 5
    with caplog.at_level(logging.INFO, logger="alpamayo_cache"):
        run(TrainConfig(store=tiny_store, run_dir=tmp_path / "r", dry_run=True, device="cpu", steps=100))
    text = "\n".join(r.getMessage() for r in caplog.records)
    per_sample = COMPUTE_S_PER_SAMPLE[("tiny", "cpu")]
    assert f"compute {per_sample * 1e3:.1f} ms/sample (measured)" in text
    assert "bound: " in text and "for 100 steps of 4 samples" in text and "read ahead" in text


def test_validation_reads_through_the_feed_function(tiny_store, tmp_path, caplog):
    """The same loss as per-sample reads + collate; a damaged sample is skipped by name, once."""
    import logging

    from alpamayo_cache.config import TINY
    from alpamayo_cache.model.expert import Prefix
    from alpamayo_cache.model.head import init_head
    from alpamayo_cache.model.policy import draw_noise
    from alpamayo_cache.store.dataset import collate, epoch_batches
    from alpamayo_cache.train.validation import VAL_SEED, validation_loss

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    reader = StoreReader(store)
    val = CachedFeatures(store, reader.select("val"), reader)
    cfg = TrainConfig(store=store, micro_batch=4, val_draws=2)
    policy = init_head(TINY)
    g, total = torch.Generator().manual_seed(VAL_SEED), 0.0
    with torch.no_grad():
        for idx in epoch_batches(val.lengths, 4, seed=0, epoch=0, shuffle=False):
            batch = collate([val[i] for i in idx])
            t, noise = draw_noise(len(idx), 2, 64, g)
            total += policy.eval()(Prefix.from_batch(batch), batch.action, t, noise).item() * len(idx)
    assert validation_loss(policy, val, cfg, "cpu", torch.float32) == pytest.approx(
        total / len(val), rel=1e-6
    )
    bad = val.sample_ids[1]
    (store / F.SAMPLES_DIR / bad / F.ACTION / "c.0.0").write_bytes(b"\0" * 8)
    with caplog.at_level(logging.WARNING, logger="alpamayo_cache"):
        first = validation_loss(policy, val, cfg, "cpu", torch.float32)
        second = validation_loss(policy, val, cfg, "cpu", torch.float32)
    assert first == second and first == first  # finite and the same: the bad sample is left out both times
    warnings = [r.getMessage() for r in caplog.records if "validation skips" in r.getMessage()]
    assert len(warnings) == 1 and bad in warnings[0] and val.skipped == {bad}
