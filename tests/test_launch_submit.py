"""launch/submit.py end to end with submitit's local executor, as users run it: through
``main()`` with ``--wait`` (a finished job, and a failing one giving exit 1), and the
documented command line ``python launch/submit.py --cluster local --tasks-per-node 2
--wait -- …`` as a subprocess (two ranks joined by submitit's environment)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ckpt_utils as cu

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def submit_main(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the function
    monkeypatch.syspath_prepend(str(cu.REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(cu.REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    from launch.submit import main

    return main


def test_main_local_wait_runs_to_the_summary(
    tmp_path: Path, submit_main, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    argv = ["--cluster", "local", "--wait", "--log-dir", str(tmp_path / "logs" / "%j")]
    with caplog.at_level(logging.INFO, logger="dist_ast.launch"):
        rc = submit_main([*argv, "--", *cu.merged(f"run_dir={run_dir}")])
    assert rc == 0, caplog.text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 1
    top1 = [round(s["top1"], 4) for s in summary["subnets"]]
    assert f"finished: 24 steps, top-1 per sub-net {top1}" in caplog.text
    assert "submitted job" in caplog.text


def test_main_wait_exits_1_when_the_job_fails(
    tmp_path: Path, submit_main, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--cluster", "local", "--wait", "--log-dir", str(tmp_path / "logs" / "%j")]
    bad = cu.merged(f"run_dir={tmp_path / 'run'}", "ast.sparsities=[0.9,0.5]")
    with caplog.at_level(logging.INFO, logger="dist_ast.launch"):
        rc = submit_main([*argv, "--", *bad])
    assert rc == 1
    assert "failed" in caplog.text and "must be strictly ascending" in caplog.text
    assert not (tmp_path / "run" / "summary.json").exists()


def test_documented_command_two_tasks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/submit.py", "--cluster", "local", "--tasks-per-node", "2"]
    cmd += ["--wait", "--log-dir", str(tmp_path / "logs" / "%j"), "--"]
    cmd += cu.merged(f"run_dir={run_dir}")  # experiment=demo train.device=cpu, 24 steps
    r = subprocess.run(cmd, cwd=cu.REPO, env=cu.env(), capture_output=True, text=True, timeout=280)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "submitted job" in out and "finished: 24 steps" in out, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2
