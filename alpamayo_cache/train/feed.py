"""Feeding the training loop: this rank's batches in the run's order, read ahead on a thread, resumable,
and the seed of each micro-batch's randomness (named by its place in the epoch, so any split over ranks
draws the same).

``Feed`` runs one reader thread that fills a ``fast_read.BatchReader`` ring ``prefetch`` batches ahead of
the step, through ``CachedFeatures.read_batch`` (the same function validation reads through), and hands
out ``Batch`` objects whose tensors are views into the ring: no copy, no collate. The training state
(epoch, batch_in_epoch) advances when the loop *takes* a batch, never when it is read, so a checkpoint
records exactly what was consumed and a resumed run sees the same batches.

Ring lifetime: ``prefetch + 1`` slots, one per batch read ahead plus the one the step is using. A slot is
given back to the reader when the loop takes the next batch; under CUDA with a non_blocking host->device
copy still possibly in flight, the hand-back carries a CUDA event recorded at that moment and the reader
waits for it before overwriting the slot.

Why a thread and not DataLoader worker processes: a worker process must hand its batch to the trainer
through shared memory, one more copy of every byte into freshly mapped pages per batch (the page faults
issue 13 measured at ~0.4 GB/s), and pinning it would be a third; the thread reads with ``os.preadv``
straight into the ring's reused (pinned) memory, and the system calls and the crc32c release the GIL.
Measured (benchmarks/real_size_io.py, 441 MB bf16 samples, page cache warm, 2-core VM under load, ratio to
a plain single-thread read of the same files): this feed 0.75; two DataLoader workers over the same fast
reader 0.16, over per-sample zarr reads + collate 0.16 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator

import torch

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.store.dataset import Batch, CachedFeatures, rank_batches
from alpamayo_cache.train.checkpoints import TrainState

DEFAULT_PREFETCH = 2  # one batch being read while one waits: enough to hide a read shorter than a step


def noise_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one micro-batch's flow-matching draws, named by its place in the epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{batch_index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def schedule(
    lengths: list[int], cfg: TrainConfig, epoch: int, start: int, rank: int, world: int
) -> Iterator[tuple[int, int, int, list[int]]]:
    """Endless (epoch, position in this rank's epoch, batch index in the epoch, sample indices) from
    (``epoch``, ``start``) on: a pure function of the seed, so any resume sees the same batches."""
    while True:
        mine = rank_batches(lengths, cfg.micro_batch, cfg.seed, epoch, rank, world)
        for pos in range(start, len(mine)):
            yield epoch, pos, *mine[pos]
        epoch, start = epoch + 1, 0


class Feed:
    """Endless (epoch, batch index, batch) for the loop; ``state`` advances as batches are taken.

    ``prefetch``: batches read ahead of the step (>= 1). ``threads``: the reader's pool over chunk files.
    ``device``: where the step runs (a CUDA device makes slot hand-backs wait on an event). Close it (or
    use it as a context manager) to stop the reader thread."""

    def __init__(
        self,
        dataset: CachedFeatures,
        cfg: TrainConfig,
        state: TrainState,
        rank: int,
        world: int,
        device: str = "cpu",
        prefetch: int = DEFAULT_PREFETCH,
        threads: int | None = None,
    ) -> None:
        self.state = state
        self.device = device
        self.cuda = device.startswith("cuda")
        self.prefetch = max(1, prefetch)
        self._items = schedule(dataset.lengths, cfg, state.epoch, state.batch_in_epoch, rank, world)
        self._first = next(self._items)  # raises here (not on the thread) when the split cannot work
        self.reader = dataset.batch_reader(cfg.micro_batch, self.prefetch + 1, threads, pin=self.cuda)
        self._dataset = dataset
        self._ready: queue.Queue = queue.Queue()  # (epoch, pos, index, batch) | an exception
        self._free: queue.Queue = queue.Queue()  # slot hand-backs: None, or a CUDA event to wait for
        for _ in range(self.prefetch + 1):
            self._free.put(None)
        self._held = False  # whether the loop holds a batch (its slot goes back on the next take)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, name="feed", daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        try:
            item = self._first
            while not self._stop.is_set():
                token = self._free.get()
                if self._stop.is_set():
                    return
                if token is not None:
                    token.synchronize()  # the slot's non_blocking copy to the GPU has finished
                epoch, pos, index, indices = item
                self._ready.put((epoch, pos, index, self._dataset.read_batch(self.reader, indices)))
                item = next(self._items)
        except BaseException as exc:  # handed to the loop at the batch it concerns
            self._ready.put(exc)

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> tuple[int, int, Batch]:
        if self._held:  # the batch the loop used is done with: its slot may be refilled
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(torch.device(self.device)))
            self._free.put(event)
            self._held = False
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._ready.put(item)  # every later call raises it too
            raise item
        epoch, pos, index, batch = item
        self._held = True
        self.state.epoch, self.state.batch_in_epoch = epoch, pos + 1
        return epoch, index, batch

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)  # wakes a reader waiting for a slot
        self._thread.join()
        self.reader.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batch_stream(
    dataset: CachedFeatures,
    cfg: TrainConfig,
    state: TrainState,
    rank: int,
    world: int,
    device: str = "cpu",
    prefetch: int | None = None,
) -> Feed:
    """The loop's feed: ``cfg.prefetch`` batches ahead (-1: ``prefetch``, the plan's choice, or the default)
    on ``cfg.num_workers`` reader threads (-1: one per core, at most 4)."""
    ahead = cfg.prefetch if cfg.prefetch >= 1 else (prefetch or DEFAULT_PREFETCH)
    threads = cfg.num_workers if cfg.num_workers >= 1 else None
    return Feed(dataset, cfg, state, rank, world, device, ahead, threads)
