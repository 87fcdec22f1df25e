"""Input pipelines: every loader yields (images NCHW float on the device, labels int64),
has ``len()`` = batches per epoch (equal on every rank), and ``state_dict()`` /
``load_state_dict()`` for its position, so a checkpoint can resume it exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_ast.config import DataConfig


@dataclass
class Loaders:
    train: Any  # infinite iterator over epochs; len() = batches per epoch per rank
    val: Any  # one pass; each rank sees its share
    num_classes: int
    train_size: int  # samples per epoch over all ranks


def build_loaders(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Loaders:
    """batch_size is the per-rank batch."""
    if cfg.name == "digits":
        from dist_ast.data.digits import NUM_CLASSES, load_digits_tensors
        from dist_ast.data.memory import TensorLoader

        if cfg.loader != "memory":
            raise ValueError(
                f"data.loader={cfg.loader!r} does not apply to data=digits (in memory): "
                "use data=digits_shards for the wds/dali loaders"
            )
        splits = load_digits_tensors(cfg.image_size)
        common = dict(batch_size=batch_size, rank=rank, world_size=world_size, device=device)
        train = TensorLoader(*splits["train"], seed=seed, augment=True, **common)
        val = TensorLoader(*splits["val"], shuffle=False, drop_last=False, **common)
        n = train.num_batches * batch_size * world_size
        return Loaders(train=train, val=val, num_classes=NUM_CLASSES, train_size=n)
    if cfg.name == "synthetic":
        from dist_ast.data.synthetic import build_synthetic

        return build_synthetic(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
        )
    if cfg.name in ("digits_shards", "cifar10", "imagenet"):
        from dist_ast.data.shards import shard_loaders

        train, val, num_classes = shard_loaders(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
        )
        n = len(train) * batch_size * world_size
        return Loaders(train=train, val=val, num_classes=num_classes, train_size=n)
    raise ValueError(f"data.name={cfg.name!r} has no loader yet")
