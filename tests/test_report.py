"""python -m dist_ast.report writes non-empty PNGs from a short run; TensorBoard holds
the scalars of metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ast.metrics import tensorboard_scalars
from dist_ast.report import main, read_metrics, xor_non_overlap
from tests.subnets_utils import short_run

PLOTS = {"accuracy", "sparsity", "layer_sparsity", "overlap", "gc", "lr_loss"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return short_run(tmp_path_factory)


def test_report_writes_every_plot(run_dir, tmp_path):
    import matplotlib.image

    written = main([str(run_dir), f"out={tmp_path}"])
    assert {p.stem for p in written} == PLOTS
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something was drawn
    _, evals = read_metrics(run_dir)
    assert [e["step"] for e in evals] == [8, 16, 24]  # eval_every=8, and the final one


def test_xor_non_overlap():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert xor_non_overlap(a, b) == 0.5 and xor_non_overlap(a, a) == 0.0


def test_tensorboard_has_the_metrics_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    want = tensorboard_scalars(steps[-1])
    assert {"train/loss", "train/lr", "sparsity/subnet_2", "gc/conflict_fraction"} <= set(want)
    assert set(want) <= tags and "eval/top1/subnet_0" in tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    top1 = acc.Scalars("eval/top1/subnet_1")
    evals = [r for r in records if "eval" in r]
    assert [e.value for e in top1] == pytest.approx([r["eval"][1]["top1"] for r in evals])
