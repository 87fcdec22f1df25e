"""Every shipped experiment config runs, as users start it, for a few steps on the CPU.

The list comes from ``configs/experiment/``, so a new config is covered without editing
this file. Each one runs exactly as shipped (its model, precision, channels_last, engine,
loader, augmentation and checkpoint settings) through ``python -m dist_ast.train``; the
only overrides are what a CPU and the test budget need: a tiny batch,
``train.stop_after_steps`` (the first steps of the unchanged schedule), and, where the
config reads a dataset that only a cluster has (ImageNet, CIFAR-10 shards), the bundled
digits written as shards in its place, with its 10 classes and a small crop. A config
that cannot run on a CPU fails here with its error; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ast.cli import compose_config
from dist_ast.config import RunConfig, config_as_dict
from dist_ast.data.writer import ensure_digits_shards

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
STEPS = 2
NEEDS_A_DATASET = ("imagenet", "cifar10")  # data configs whose data.root a cluster provides


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits_shards")
    ensure_digits_shards(root)
    return root


def cpu_overrides(shipped: RunConfig, shards: Path) -> list[str]:
    """What a CPU and a test budget need on top of the shipped config, nothing else."""
    out = [f"train.stop_after_steps={STEPS}", "train.batch_size=16", "train.progress=false"]
    if shipped.data.name in NEEDS_A_DATASET:
        out += [
            f"data.root={shards}",
            "model.num_classes=10",
            f"data.image_size={min(shipped.data.image_size, 32)}",
            "data.num_workers=1",
        ]
    return out


def test_the_experiment_folder_is_not_empty() -> None:
    assert {"demo", "r50_imagenet_ast", "wrn32_cifar_ast"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_experiment_runs_on_cpu(name: str, digits_shards: Path, tmp_path: Path) -> None:
    shipped = compose_config([f"experiment={name}"])
    run_dir = tmp_path / "run"
    overrides = [f"experiment={name}", f"run_dir={run_dir}", *cpu_overrides(shipped, digits_shards)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_ast.train", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"experiment={name} failed on CPU:\n{proc.stderr[-4000:]}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    # The schedule is the shipped one, not one shortened to the steps that ran.
    assert summary["total_steps"] > STEPS
    assert [s["target_sparsity"] for s in summary["subnets"]] == shipped.ast.sparsities
    assert all(s["top1"] is not None for s in summary["subnets"])

    # Everything that decides which code paths run is as shipped.
    ran = json.loads((run_dir / "config.json").read_text())
    want = config_as_dict(shipped)
    for section, keys in {
        "model": ("name", "small_input", "dense_classifier", "zero_init_residual"),
        "data": ("name", "loader"),
        "ast": ("mode", "sparsities", "update_every", "stagger", "ramp_end_epoch", "nm_patterns"),
        "optim": ("lr", "weight_decay", "warmup_epochs", "label_smoothing"),
        "engine": ("name", "zero_stage", "compact_allreduce"),
        "checkpoint": ("every_steps", "every_minutes", "keep", "async_save"),
        "train": ("epochs", "precision", "channels_last"),
    }.items():
        for key in keys:
            assert ran[section][key] == want[section][key], f"{section}.{key} was overridden"

    ckpt = shipped.checkpoint
    if ckpt.every_steps or ckpt.every_minutes:  # a trial run leaves a checkpoint to resume
        meta = json.loads((run_dir / "checkpoints" / f"step-{STEPS}" / "meta.json").read_text())
        assert meta["step"] == STEPS


@pytest.mark.slow
def test_readme_flagship_trial_command_runs(tmp_path: Path) -> None:
    """The README's "try the flagship for 2 steps" command, word for word (plus run_dir)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("python -m dist_ast.train experiment=r50_imagenet_ast data=synthetic")
    command = readme[start : readme.index("#", start)].replace("\\\n", " ").split()
    assert "train.stop_after_steps=2" in command
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, *command[1:], f"run_dir={run_dir}", "train.progress=false"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["subnets"]) == 3
