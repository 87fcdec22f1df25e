"""End to end: ``torchrun --nproc_per_node=2 -m dist_ast.train experiment=demo …`` on CPU
gives the summary of the single-process run with the same global batch.

Tolerance: mask counts, sparsities, step and GC-check counts are exact (the schedule and
rank-0 decisions do not depend on the split); training FLOPs within 1% (the same total
count of live weights, spread slightly differently over layers); top-1 within 0.15.
The runs are not bit-identical because BatchNorm normalizes each rank's half batch and
the demo's augmentation draws per rank; the exact 2-ranks-equals-1-rank check is
tests/test_distributed_ddp.py::test_two_ranks_equal_one_rank_exact_groupnorm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ast.cli import compose_config
from dist_ast.train import run
from tests.cli_utils import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

OVERRIDES = [
    "experiment=demo",
    "train.progress=false",
    "train.max_steps=30",
    "ast.ramp_end_epoch=0.5",
    "ast.update_every=9",
    "ast.stagger=3",
    "train.log_every=10",
]


def test_torchrun_two_ranks_summary_equals_single_process(tmp_path: Path) -> None:
    two = tmp_path / "two"
    proc = torchrun("dist_ast.train", *OVERRIDES, f"run_dir={two}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((two / "summary.json").read_text())

    ref = run(compose_config([*OVERRIDES, f"run_dir={tmp_path / 'one'}"]))
    assert got["world_size"] == 2 and ref["world_size"] == 1
    for key in ("steps", "mode", "gc_checked"):
        assert got[key] == ref[key], key
    assert got["train_flops"] == pytest.approx(ref["train_flops"], rel=0.01)
    for a, b in zip(got["subnets"], ref["subnets"], strict=True):
        assert (a["nonzero"], a["total"], a["sparsity"]) == (
            b["nonzero"],
            b["total"],
            b["sparsity"],
        )
        assert abs(a["top1"] - b["top1"]) <= 0.15, (a, b)
