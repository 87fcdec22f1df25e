"""Short demo runs that many trainer-level tests build in this process (one CPU rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_ast.cli import compose_config
from dist_ast.distributed.setup import DistInfo
from dist_ast.train import Trainer, build_trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# 60 steps of the demo at batch 32 on 16-px images: the cubic ramp ends at step 46, and
# each sub-net updates its masks every 12 steps, 4 steps after the previous one.
RAMP60 = [
    "experiment=demo",
    "train.max_steps=60",
    "train.batch_size=32",
    "data.image_size=16",
    "model.width=8",
    "train.progress=false",
    "ast.ramp_start_epoch=0",
    "ast.ramp_end_epoch=1",
    "ast.update_every=12",
    "ast.stagger=4",
]

# 40 steps of the demo at batch 32 (full-size images), ramp over half an epoch.
DEMO40 = [
    "experiment=demo",
    "train.max_steps=40",
    "train.batch_size=32",
    "model.width=8",
    "train.progress=false",
    "ast.ramp_end_epoch=0.5",
    "ast.update_every=12",
    "ast.stagger=4",
]


def cpu_trainer(base: list[str], run_dir: Path, *overrides: str) -> Trainer:
    """``build_trainer`` of ``base`` + ``overrides`` on one CPU process, writing to run_dir."""
    return build_trainer(compose_config([*base, f"run_dir={run_dir}", *overrides]), CPU)
