"""The demo end to end through the command line, on a shorter schedule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_command_trains_every_subnet_well_above_chance(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dist_ast.train",
        "experiment=demo",
        f"run_dir={tmp_path}",
        "train.epochs=8",
        "ast.ramp_end_epoch=5",
        "ast.update_every=15",
        "ast.stagger=5",
        "model.width=16",
        "train.progress=false",
        "train.eval_every=60",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured sparsity" in proc.stdout  # the table on stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "alternating" and summary["world_size"] == 1
    assert summary["steps"] == 8 * (1500 // 64)
    for sub in summary["subnets"]:
        assert abs(sub["sparsity"] - sub["target_sparsity"]) < 1e-4
        assert sub["sparsity"] == pytest.approx(1 - sub["nonzero"] / sub["total"])
        assert sub["top1"] > 0.6, sub  # chance is 0.1
    assert summary["gc_conflicts"] > 0
    assert summary["train_flops"] < 0.5 * summary["train_flops_individual"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {"step", "subnet", "loss", "lr", "sparsity"} <= set(steps[0])
    assert any("eval" in r for r in records)
    assert [r["subnet"] for r in steps[:5]] == [(r["step"] - 1) % 3 for r in steps[:5]]
