"""``data=synthetic``: random tensors generated once on the device, for benchmarks that
must not measure the input pipeline. A pool of a few distinct batches is cycled;
``data.synthetic_size`` sets the samples per epoch. ImageNet-sized images
(``image_size >= 64``) come with 1000 classes, smaller ones with 10: set
``model.num_classes`` to match."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dist_ast.data.memory import LoaderPosition

POOL_BATCHES = 4
VAL_BATCHES = 8  # per rank


def synthetic_classes(image_size: int) -> int:
    return 1000 if image_size >= 64 else 10


class SyntheticLoader(LoaderPosition):
    def __init__(
        self,
        *,
        num_batches: int,
        batch_size: int,
        image_size: int,
        num_classes: int,
        seed: int,
        device: torch.device,
        endless: bool = True,
    ) -> None:
        if num_batches < 1:
            raise ValueError(
                "data.synthetic_size cannot fill one batch per rank: raise it or lower "
                "train.batch_size"
            )
        self.num_batches, self.endless = num_batches, endless
        g = torch.Generator().manual_seed(seed)
        n = min(POOL_BATCHES, num_batches)
        x = torch.randn(n, batch_size, 3, image_size, image_size, generator=g)
        y = torch.randint(0, num_classes, (n, batch_size), generator=g)
        self.x, self.y = x.to(device), y.to(device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.endless:
            for b in range(self.num_batches):
                yield self.x[b % len(self.x)], self.y[b % len(self.y)]
            return
        while True:
            while self.batches_consumed < self.num_batches:
                b = self.batches_consumed
                self.batches_consumed += 1
                yield self.x[b % len(self.x)], self.y[b % len(self.y)]
            self.epoch += 1
            self.batches_consumed = 0


def build_synthetic(
    cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int, device: Any
) -> tuple[SyntheticLoader, SyntheticLoader, int]:
    """(train, val, num_classes) for ``data=synthetic``."""
    device = torch.device(device)
    k = synthetic_classes(cfg.image_size)
    common = dict(batch_size=batch_size, image_size=cfg.image_size, num_classes=k, device=device)
    nb = cfg.synthetic_size // (batch_size * world_size)
    train = SyntheticLoader(num_batches=nb, seed=seed * 1000 + rank, **common)
    # Random labels make the score meaningless: a few batches show that evaluation runs
    # (a quarter of ImageNet-sized synthetic data takes minutes per sub-net on a CPU).
    val = SyntheticLoader(
        num_batches=max(1, min(nb // 4, VAL_BATCHES)),
        seed=seed * 1000 + rank + 7,
        endless=False,
        **common,
    )
    return train, val, k
