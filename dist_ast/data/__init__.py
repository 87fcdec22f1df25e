"""Input pipelines: every loader yields (images NCHW float on the device, labels int64),
has ``len()`` = batches per epoch (equal on every rank), and ``state_dict()`` /
``load_state_dict()`` for its position, so a checkpoint can resume it exactly.

``build_loaders`` is the one factory that chooses the loader. Below it: ``shardset``
(the shard format and reading side), ``transforms`` (decoding, augmentation), ``writer``
and its CLI ``shards``, the loaders ``wds`` and ``dali``, and the in-memory ``memory``,
``digits``, ``synthetic``. Loaders import ``shardset`` and ``transforms``, never each
other nor this package (tests/test_architecture.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_ast.config import DataConfig
from dist_ast.data.dali import DaliEvalLoader, DaliTrainLoader, dali_available
from dist_ast.data.digits import NUM_CLASSES as DIGITS_CLASSES
from dist_ast.data.digits import load_digits_tensors
from dist_ast.data.memory import TensorLoader
from dist_ast.data.shardset import MANIFEST, ShardError
from dist_ast.data.synthetic import build_synthetic
from dist_ast.data.wds import WdsEvalLoader, WdsTrainLoader
from dist_ast.data.writer import DIGITS_SHARDS_ROOT, ensure_digits_shards

SHARD_DATASETS = ("digits_shards", "cifar10", "imagenet")


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
    common = dict(rank=rank, world_size=world_size, seed=seed, device=device)
    if cfg.name == "digits":
        train, val, num_classes = _digits_loaders(cfg, batch_size=batch_size, **common)
    elif cfg.name == "synthetic":
        train, val, num_classes = build_synthetic(cfg, batch_size=batch_size, **common)
    elif cfg.name in SHARD_DATASETS:
        train, val, num_classes = _shard_loaders(cfg, batch_size=batch_size, **common)
    else:
        raise ValueError(f"data.name={cfg.name!r} has no loader yet")
    n = len(train) * batch_size * world_size
    return Loaders(train=train, val=val, num_classes=num_classes, train_size=n)


def _digits_loaders(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device: Any
) -> tuple[TensorLoader, TensorLoader, int]:
    if cfg.loader != "memory":
        raise ValueError(
            f"data.loader={cfg.loader!r} does not apply to data=digits (in memory): "
            "use data=digits_shards for the wds/dali loaders"
        )
    splits = load_digits_tensors(cfg.image_size)
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, device=device)
    train = TensorLoader(*splits["train"], seed=seed, augment=True, **common)
    val = TensorLoader(*splits["val"], shuffle=False, drop_last=False, **common)
    return train, val, DIGITS_CLASSES


def _shard_loaders(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device: Any
) -> tuple[Any, Any, int]:
    """(train, val, num_classes) for a DataConfig naming a shard dataset."""
    root = cfg.root
    if cfg.name == "digits_shards":
        root = root or DIGITS_SHARDS_ROOT
        ensure_digits_shards(root)
    if not root:
        raise ShardError(f"data.root is empty: point it at a shard directory for data={cfg.name}")
    if not (Path(root) / MANIFEST).exists():
        hint = (
            " Point data.root at a folder written by `python -m dist_ast.data.shards --src "
            "<ImageFolder tree> --out <shard dir>`."
        )
        if not Path(root).is_dir():
            hint = f" The folder does not exist.{hint}"
        elif (Path(root) / "train").is_dir():
            hint = (
                f" It looks like an ImageFolder tree: convert it with `python -m "
                f"dist_ast.data.shards --src {root} --out <shard dir>` and set data.root to "
                "the shard dir."
            )
        raise ShardError(f"data.root={root!r} has no {MANIFEST}.{hint}")
    device = torch.device(device)
    common = dict(
        dataset=cfg.name,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        image_size=cfg.image_size,
        num_workers=cfg.num_workers,
    )
    if cfg.loader == "wds":
        train = WdsTrainLoader(root, seed=seed, rrc_min=cfg.random_resized_crop_min, **common)
        val = WdsEvalLoader(root, **common)
    elif cfg.loader == "dali":
        if not dali_available():
            raise ImportError(
                "data.loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130, or the "
                "[dali] extra); data.loader=wds reads the same shards without it"
            )
        train = DaliTrainLoader(root, seed=seed, rrc_min=cfg.random_resized_crop_min, **common)
        val = DaliEvalLoader(root, **common)
    else:
        raise ValueError(
            f"data.loader={cfg.loader!r} does not apply to data={cfg.name} (shards): "
            "choose wds or dali"
        )
    return train, val, train.shards.num_classes
