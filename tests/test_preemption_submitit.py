"""launch/submit.py with submitit's local executor: a job interrupted the way Slurm warns
before a time limit (USR2) saves on the ranks' agreed step, is requeued by submitit
(exit 144, which the local executor reruns) and resumes to the same result as an
uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dist_ast.checkpoint import complete_checkpoints
from tests import ckpt_utils as cu


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_submitit_local_interrupt_requeues_and_resumes(tmp_path, tmp_path_factory, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(cu.REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(cu.REPO))
    from launch.submit import TrainJob, build_executor, parse

    reference = cu.reference_run(1, tmp_path_factory)
    run_dir = tmp_path / "run"
    args, overrides = parse(
        [
            "--cluster",
            "local",
            "--log-dir",
            str(tmp_path / "logs" / "%j"),
            "--timeout-min",
            "20",
            "--",
            *cu.merged(f"run_dir={run_dir}"),
        ]
    )
    assert sys.executable  # submitit runs the job with this interpreter
    job = build_executor(args).submit(TrainJob(overrides))
    try:
        cu.wait_until(lambda: cu.last_step(run_dir) >= 9 or job.done(), 240, "step 9", poll=0.05)
        assert not job.done(), job.stderr()
        # what Slurm's --signal=USR2@… does before the time limit: USR2 to the task
        # processes (the local executor's controller would only pass on SIGTERM)
        tasks = _children(job._process.pid)
        assert tasks, "no task process under the local controller"
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        summary = job.result()
    finally:
        if not job.done():
            job.cancel()
    log = job.stderr() or ""
    assert "preempted by SIGUSR2: saved step" in log, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    saved = int(log.split("saved step ")[1].split(",")[0])
    assert saved >= 9 and saved in [s for s, _ in complete_checkpoints(run_dir)] + [24]
    assert summary["steps"] == 24
    cu.assert_same_run(reference, run_dir)
