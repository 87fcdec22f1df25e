"""The webdataset loader (``data.loader=wds``): shards read with webdataset's tar
iterator, decoded and augmented with PIL + torchvision in DataLoader workers.

The epoch (docs/data.md, shared with DALI): rank r reads its contiguous slice as an
endless cyclic stream, epoch e being the next B = N // (W*b) batches, so nothing is
dropped for good. Epoch e's batches are split into contiguous ranges, one per worker;
a worker permutes blocks of ``shuffle_batches`` batches with a seed from (seed, epoch,
rank, block) and augments with one from (seed, epoch, rank, batch). The DataLoader
hands out worker batches round-robin, so on resume each worker skips what it delivered
and the worker order is rotated: the batches are bit-identical (given the same worker
count). An undecodable JPEG is replaced by another sample of its batch and counted
(``stats()["bad_samples"]``); a bad label, shard or index is a ShardError.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_ast.data.shardset import (
    ShardError,
    ShardSet,
    SliceLoader,
    read_cyclic,
    read_samples,
)
from dist_ast.data.transforms import Normalizer, build_transform, decode_jpeg, mix_seed

log = logging.getLogger(__name__)


def split_counts(total: int, n: int) -> list[int]:
    """``total`` items over n workers, contiguous, the first total % n get one more (this
    matches the DataLoader's round-robin, so output t = worker t % n, item t // n)."""
    q, r = divmod(total, n)
    return [q + (w < r) for w in range(n)]


def _make_batch(
    samples: list[tuple[str, bytes, int, str]],
    transform,
    gen_seed: int,
    normalize: Normalizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode + augment a batch; a sample that fails to decode is replaced by the next
    good one of the batch (and counted). All random draws come from gen_seed."""
    images: list[Any] = []
    bad: list[int] = []
    for i, (key, jpg, _label, tar) in enumerate(samples):
        try:
            images.append(decode_jpeg(jpg))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            log.warning(
                "shard %s key %s: undecodable JPEG (%s); replaced in its batch", tar, key, e
            )
            images.append(None)
            bad.append(i)
    good = [i for i, im in enumerate(images) if im is not None]
    if not good:
        key, _, _, tar = samples[0]
        raise ShardError(f"no decodable JPEG in a whole batch (shard {tar}, from key {key})")
    labels = [s[2] for s in samples]
    for j, i in enumerate(bad):
        src = good[j % len(good)]
        images[i], labels[i] = images[src], labels[src]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gen_seed)
        x = torch.stack([transform(im) for im in images])
    if normalize is not None:
        x = normalize(x)
    return x, torch.tensor(labels, dtype=torch.int64), len(bad)


@dataclass
class _TrainSpec:
    """What a worker needs to make any training batch (picklable, no DataLoader)."""

    shards: ShardSet
    lo: int
    hi: int
    num_batches: int
    batch_size: int
    seed: int
    rank: int
    workers: int
    shuffle_batches: int
    transform: Any
    normalize: Normalizer | None  # in the workers (CPU training) or None (on the device)

    def read_stream(self, epoch: int, q0: int, q1: int) -> list[tuple[str, bytes, int, str]]:
        """Samples at stream positions [q0, q1) of an epoch's window (cyclic over the slice)."""
        base = epoch * self.num_batches * self.batch_size
        runs = read_cyclic(self.shards, self.lo, self.hi, base + q0, base + q1)
        return [s for run in runs for s in run]


class _EpochStream(IterableDataset):
    """The rest of one epoch of a rank's training batches, split over the workers. The
    epoch and the start batch live in shared memory, so persistent workers pick up each
    new epoch (or a resume position) when the main process starts a new pass."""

    def __init__(self, spec: _TrainSpec) -> None:
        self.spec = spec
        self.epoch = mp.RawValue("q", 0)
        self.start = mp.RawValue("q", 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        L, epoch, start = self.spec, self.epoch.value, self.start.value
        info = get_worker_info()
        slot = info.id if info is not None else 0
        n = L.workers
        w = (slot + start) % n  # rotation: output `start` comes from worker start % n
        counts = split_counts(L.num_batches, n)
        first = sum(counts[:w])  # worker w's first epoch batch
        done = -(-(start - w) // n) if start > w else 0  # delivered before a resume
        m = L.shuffle_batches
        for j in range(done // m * m, counts[w], m):
            t0 = first + j  # first epoch batch of this block
            nb = min(m, counts[w] - j)
            q0 = t0 * L.batch_size  # stream position within the epoch window
            samples = L.read_stream(epoch, q0, q0 + nb * L.batch_size)
            perm = np.random.default_rng(mix_seed(L.seed, epoch, L.rank, t0)).permutation(
                len(samples)
            )
            for i in range(max(0, done - j), nb):
                sel = perm[i * L.batch_size : (i + 1) * L.batch_size]
                seed = mix_seed(L.seed, epoch, L.rank, t0 + i, 1)
                yield _make_batch([samples[k] for k in sel], L.transform, seed, L.normalize)


class WdsTrainLoader(SliceLoader):
    """Endless training batches over epochs (``SliceLoader``'s arguments, and
    ``shuffle_batches``)."""

    endless = True

    def __init__(self, root: str, *, shuffle_batches: int | None = None, **common: Any) -> None:
        super().__init__(root, split="train", **common)
        self.workers = max(1, self.num_workers)
        # shuffle blocks of about 1024 samples per worker (like a 1024-sample buffer)
        self.shuffle_batches = shuffle_batches or max(1, math.ceil(1024 / self.batch_size))
        on_gpu = self.device.type == "cuda"
        self.spec = _TrainSpec(
            shards=self.shards,
            lo=self.lo,
            hi=self.hi,
            num_batches=self.num_batches,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=self.rank,
            workers=self.workers,
            shuffle_batches=self.shuffle_batches,
            transform=build_transform(self.dataset, True, self.image_size, self.rrc_min),
            normalize=None if on_gpu else Normalizer(self.dataset, self.device),
        )
        self.normalize = Normalizer(self.dataset, self.device)
        self.epoch = 0
        self.batches_consumed = 0
        self._saved_workers = self.workers
        self._stream: _EpochStream | None = None
        self._dl: DataLoader | None = None

    def read_stream(self, epoch: int, q0: int, q1: int) -> list[tuple[str, bytes, int, str]]:
        return self.spec.read_stream(epoch, q0, q1)

    def _loader(self) -> tuple[_EpochStream, DataLoader]:
        if self._dl is None:
            self._stream = _EpochStream(self.spec)
            self._dl = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2 if self.num_workers else None,
                persistent_workers=self.num_workers > 0,  # no fork per epoch
            )
        assert self._stream is not None
        return self._stream, self._dl

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._saved_workers != self.workers and self.batches_consumed:
            log.warning(
                "resuming a wds loader saved with %d workers on %d: the rest of epoch %d "
                "follows the new worker order (some samples repeat or skip this epoch)",
                self._saved_workers,
                self.workers,
                self.epoch,
            )
        stream, dl = self._loader()
        while True:
            if self.batches_consumed < self.num_batches:
                stream.epoch.value = self.epoch
                stream.start.value = self.batches_consumed
                for x, y, bad in dl:
                    self.bad_samples += int(bad)
                    self.batches_consumed += 1
                    x = x.to(self.device, non_blocking=True)
                    if x.dtype == torch.uint8:
                        x = self.normalize(x)
                    yield x, y.to(self.device, non_blocking=True)
            self.epoch += 1
            self.batches_consumed = 0
            self._saved_workers = self.workers

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "workers": self.workers,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        self._saved_workers = int(state.get("workers", self.workers))
        self.bad_samples = int(state.get("bad_samples", 0))


class _EvalStream(IterableDataset):
    def __init__(self, loader: WdsEvalLoader) -> None:
        self.l = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        L = self.l
        info = get_worker_info()
        w = info.id if info is not None else 0
        counts = split_counts(L.num_batches, L.workers)
        t0 = sum(counts[:w])
        for t in range(t0, t0 + counts[w]):
            g0 = L.lo + t * L.batch_size
            samples = read_samples(L.shards, g0, min(L.hi, g0 + L.batch_size))
            yield _make_batch(samples, L.transform, 0, L.worker_normalize)


class WdsEvalLoader(SliceLoader):
    """One pass over the rank's contiguous share of the validation split, no padding."""

    def __init__(self, root: str, **common: Any) -> None:
        super().__init__(root, **common)
        self.num_workers = min(self.num_workers, self.num_batches)
        self.workers = max(1, self.num_workers)
        self.transform = build_transform(self.dataset, False, self.image_size, 0.08)
        self.normalize = Normalizer(self.dataset, self.device)
        cpu = self.device.type != "cuda"
        self.worker_normalize = Normalizer(self.dataset, torch.device("cpu")) if cpu else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_batches == 0:
            return
        dl = DataLoader(
            _EvalStream(self),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y, bad in dl:
            self.bad_samples += int(bad)
            x = x.to(self.device)
            yield (self.normalize(x) if x.dtype == torch.uint8 else x), y.to(self.device)
