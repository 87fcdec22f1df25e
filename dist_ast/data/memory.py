"""A loader over tensors held in memory: the demo data and the synthetic benchmark data.

Every rank sees the same number of batches (the epoch is cut to a multiple of
world_size * per-rank batch), each epoch is a fresh permutation drawn from
(seed, epoch), and the position is two integers, so a resumed loader yields exactly
the batches the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class LoaderPosition:
    """A loader's position: the epoch and the batches consumed in it."""

    epoch = 0
    batches_consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])


class TensorLoader(LoaderPosition):
    """Sharded, shuffled, resumable batches of (images, labels) from two tensors."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augment: bool = False,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.device = torch.device(device)
        self.augment = augment
        n = len(images)
        if drop_last:
            self.num_batches = n // (batch_size * world_size)
        else:
            self.num_batches = -(-n // (batch_size * world_size))
        if self.num_batches == 0:
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} "
                "ranks: lower train.batch_size"
            )

    def __len__(self) -> int:
        return self.num_batches

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(n, generator=g)

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        order = self._order(epoch)
        per_rank = self.num_batches * self.batch_size
        if self.drop_last:
            order = order[: per_rank * self.world_size]
            return order[self.rank :: self.world_size]
        # Evaluation: no padding; ranks take contiguous, possibly unequal, slices.
        chunk = -(-len(order) // self.world_size)
        return order[self.rank * chunk : (self.rank + 1) * chunk]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # Random crop with 2-pixel padding and no flip (digits are not mirror-symmetric).
        pad = 2
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        h, w = x.shape[-2:]
        out = torch.empty_like(x)
        offs = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=g)
        for i, (dy, dx) in enumerate(offs.tolist()):
            out[i] = xp[i, :, dy : dy + h, dx : dx + w]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            idx = self._rank_indices(self.epoch)
            start = self.batches_consumed
            for b in range(start, self.num_batches):
                sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
                if len(sel) == 0:
                    break
                x, y = self.images[sel], self.labels[sel]
                if self.augment:
                    g = torch.Generator().manual_seed(
                        (self.seed * 100_003 + self.epoch) * 10_007 + b * 131 + self.rank
                    )
                    x = self._augment(x, g)
                self.batches_consumed = b + 1
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if not self.drop_last:
                self.batches_consumed = 0
                return
            self.epoch += 1
            self.batches_consumed = 0
