"""slurm/r50_ast.sh on the local CPU Slurm (scripts/slurm-local.sh): the demo on 2 ranks
(one task running torchrun with 2 workers), requeued mid-run with `scontrol requeue`,
finishes with the same summary, weights, masks and BatchNorm statistics as an
uninterrupted 2-rank run.

Skips (with the reason) when sbatch is missing or no slurmctld answers; CI sets
DIST_AST_REQUIRE_SLURM=1 (after starting the cluster) to fail instead.
"""

from __future__ import annotations

import os
import sys

import pytest

try:
    from tests import ckpt_utils as cu
    from tests.slurm_utils import requeue, require_slurm, state, submit, wait
except ImportError:  # plain `pytest` without the repo root on sys.path
    import ckpt_utils as cu
    from slurm_utils import requeue, require_slurm, state, submit, wait

FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def _slurm():
    require_slurm()


def test_sbatch_requeue_mid_run_resumes_to_the_same_result(tmp_path, tmp_path_factory):
    reference = cu.reference_run(2, tmp_path_factory)
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    overrides = [o for o in cu.SHORT if not o.startswith(("experiment=", "train.device="))]
    job = submit(
        cu.REPO / "slurm" / "r50_ast.sh",
        # the #SBATCH lines ask for 4 GPU nodes; the local cluster is one 2-CPU node
        args=[
            "--nodes=1",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            "--time=10",
            f"--output={out}",
            "--job-name=dist_ast-test-resume",
        ],
        env={
            "EXPERIMENT": "demo",
            "GPUS_PER_NODE": "2",
            "DEVICE": "cpu",
            "RUN_DIR": str(run_dir),
            "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(cu.REPO),
        },
        cwd=cu.REPO,
        script_args=overrides,
    )
    try:
        cu.wait_until(
            # transient states (CONFIGURING, COMPLETING, "") must not end the wait
            lambda: (run_dir / "checkpoints" / "step-8").is_dir() or state(job) in FINISHED,
            timeout=240,
            what="the first checkpoint",
            poll=0.1,
        )
        assert (run_dir / "checkpoints" / "step-8").is_dir(), out.read_text()[-3000:]
        assert state(job) == "RUNNING", out.read_text()[-3000:]
        requeue(job)  # SIGTERM to every process: the ranks save, Slurm requeues the job
        final = wait(job, timeout=400)
    except BaseException:
        os.system(f"scancel {job}")
        raise
    log = out.read_text()
    assert final == "COMPLETED", log[-3000:]
    assert "restart 1:" in log and "resumed from" in log, log[-3000:]
    assert "preempted by SIGTERM: saved step" in log
    cu.assert_same_run(reference, run_dir)
