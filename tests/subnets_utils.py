"""Helpers of the sub-net tool tests (export, dynamic, evaluate, report): a model whose
sub-nets differ everywhere without training, and one short real training run shared
by the test modules of a session."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_ast.config import RunConfig
from dist_ast.models import build_subnet_model
from dist_ast.sparsity import nm
from dist_ast.sparsity.layers import SwitchableBatchNorm2d
from dist_ast.sparsity.masks import random_masks

# 24 steps of 3 tiny-CNN sub-nets on digits: mask updates at 0/3/6, 9/12/15, 18/21 (the
# ramp ends at step 9), an evaluation every 8 steps, a DCP checkpoint every 12 steps.
SHORT_RUN = [
    "experiment=demo",
    "train.progress=false",
    "train.device=cpu",
    "train.max_steps=24",
    "train.batch_size=16",
    "train.log_every=2",
    "train.eval_every=8",
    "ast.ramp_end_epoch=0.1",
    "ast.update_every=9",
    "ast.stagger=3",
    "checkpoint.every_steps=12",
]


def random_subnets(config: RunConfig, seed: int = 0, nm_patterns=None):
    """A SubnetModel whose sub-nets differ in masks and in every BatchNorm row."""
    torch.manual_seed(seed)
    model = build_subnet_model(config.model, config.ast.num_subnets)
    for k, s in enumerate(config.ast.sparsities):
        if nm_patterns:
            masks = [
                nm.nm_update(w, m, None, nm_patterns[k], fraction=1.0, regrow_fraction=0.0)
                for w, m in zip(model.sparse_weights(), model.masks(k), strict=True)
            ]
        else:
            g = torch.Generator().manual_seed(seed * 1009 + k)
            masks = random_masks(model.sparse_weights(), 1.0 - s, g, per_layer=True)
        model.set_masks(k, masks)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, SwitchableBatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def short_run(tmp_path_factory) -> Path:
    """The run folder of SHORT_RUN, trained once per test session."""
    from dist_ast.cli import compose_config
    from dist_ast.train import run

    run_dir = tmp_path_factory.getbasetemp() / "subnets_short_run"
    if not (run_dir / "summary.json").is_file():
        run(compose_config([*SHORT_RUN, f"run_dir={run_dir}"]))
    return run_dir


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
