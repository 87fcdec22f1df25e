"""python -m dist_ast.evaluate: every sub-net's top-1/top-5 and sparsity from one
checkpoint (model.pt or a DCP step folder), the same numbers on 1 and 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ast.evaluate import main
from dist_ast.subnets_io import load_model_state, resolve_checkpoint
from tests.cli_utils import torchrun
from tests.subnets_utils import read_summary, short_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return short_run(tmp_path_factory)


def test_cli_matches_the_training_summary(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    report = main([f"ckpt={run_dir / 'model.pt'}", "data=digits", f"json={out}", "layers=true"])
    assert json.loads(out.read_text())["subnets"] == report["subnets"]
    summary = read_summary(run_dir)
    assert [s["index"] for s in report["subnets"]] == [0, 1, 2]
    for got, want in zip(report["subnets"], summary["subnets"], strict=True):
        assert got["top1"] == pytest.approx(want["top1"], abs=1e-12)
        assert got["top5"] == pytest.approx(want["top5"], abs=1e-12)
        assert got["sparsity"] == pytest.approx(want["sparsity"], abs=1e-12)
        assert got["nonzero"] == want["nonzero"]
        assert got["sparsity_all_layers"] < got["sparsity"]  # the first conv is dense
        assert got["zero_fraction"] >= got["sparsity"]
        # Per layer: nonzero counts recombine to the global count.
        config, state = load_model_state(run_dir / "model.pt")
        total = 0
        for name, s in got["layers"].items():
            masks = state[f"net.{name}.masks"][got["index"]]
            assert s == pytest.approx(1.0 - float(masks.float().mean()), abs=1e-12)
            total += int(masks.sum())
        assert total == got["nonzero"]
    # Only some sub-nets.
    two = main([f"ckpt={run_dir}", "subnets=2,0"])
    assert [s["index"] for s in two["subnets"]] == [2, 0]


def test_dcp_checkpoint_loads_the_same_model(run_dir):
    assert resolve_checkpoint(run_dir) == run_dir / "model.pt"  # written after step-24
    ckpt = run_dir / "checkpoints" / "step-24"
    config_dcp, dcp_state = load_model_state(ckpt)
    config_pt, pt_state = load_model_state(run_dir / "model.pt")
    assert config_dcp == config_pt
    assert dcp_state.keys() == pt_state.keys()
    for key, t in pt_state.items():
        assert torch.equal(dcp_state[key], t), key
    # An earlier checkpoint holds other masks.
    _, early = load_model_state(run_dir / "checkpoints" / "step-12")
    assert any(not torch.equal(early[k], pt_state[k]) for k in pt_state if k.endswith("masks"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_one_rank_numbers(run_dir, tmp_path):
    out = tmp_path / "eval2.json"
    proc = torchrun(
        "dist_ast.evaluate",
        f"ckpt={run_dir / 'model.pt'}",
        "batch_size=64",
        "device=cpu",
        f"json={out}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    one = main([f"ckpt={run_dir / 'model.pt'}", "batch_size=64", "device=cpu"])
    for a, b in zip(one["subnets"], two["subnets"], strict=True):
        assert a["samples"] == b["samples"]
        assert a["top1"] == pytest.approx(b["top1"], abs=1e-12)
        assert a["top5"] == pytest.approx(b["top5"], abs=1e-12)


def test_data_overrides_apply_on_the_checkpoints_data():
    from dist_ast.cli import compose_config
    from dist_ast.config import DataConfig
    from dist_ast.evaluate import _data_config

    base = DataConfig(name="digits", image_size=40)
    keep = _data_config(base, ["data.num_workers=0"], compose_config)
    assert (keep.name, keep.image_size, keep.num_workers) == ("digits", 40, 0)
    other = _data_config(base, ["data=cifar10", "data.root=/x"], compose_config)
    assert (other.name, other.root) == ("cifar10", "/x")
