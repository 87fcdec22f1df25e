"""Every expected failure of the command line is one line on stderr and its documented
exit code (README, "When things go wrong"); a bug keeps its traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dist_ast.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA
from tests.ckpt_utils import PY, REPO, env, run_train
from tests.cli_utils import TINY, assert_one_line, dist_ast_train


def test_config_error(tmp_path: Path) -> None:
    proc = dist_ast_train(*TINY, f"run_dir={tmp_path}", "ast.sparsities=[0.9,0.5]")
    assert_one_line(proc, EXIT_CONFIG, "config error", "ast.sparsities", "ascending")


def test_missing_shard_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-shards"
    proc = dist_ast_train(
        *TINY, f"run_dir={tmp_path / 'run'}", "data=cifar10", f"data.root={missing}"
    )
    assert_one_line(proc, EXIT_DATA, "data error", str(missing), "does not exist")
    assert not missing.exists(), "nothing is written for a missing data folder"


def test_explicit_checkpoint_that_does_not_exist(tmp_path: Path) -> None:
    proc = dist_ast_train(*TINY, f"run_dir={tmp_path}", f"checkpoint.resume={tmp_path / 'step-9'}")
    assert_one_line(proc, EXIT_CHECKPOINT, "checkpoint error", "step-9")


@pytest.mark.slow
def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.stop_after_steps=8", "model.width=8")
    proc = dist_ast_train(*TINY, f"run_dir={run_dir}", "model=resnet18")
    assert_one_line(proc, EXIT_CHECKPOINT, "checkpoint error", "does not match", "resnet18")


def test_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    """An unexpected exception is not dressed up as an expected one."""
    code = (
        "import sys; from dist_ast.cli import hydra_main\n"
        "def boom(config): raise KeyError('a bug')\n"
        "sys.argv = ['x', 'experiment=demo', 'run_dir=" + str(tmp_path) + "']\n"
        "hydra_main(boom)\n"
    )
    proc = subprocess.run(
        [PY, "-c", code], cwd=REPO, env={**env(), "HYDRA_FULL_ERROR": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'a bug'" in proc.stderr
    assert "dist_ast: " not in proc.stderr
