"""slurm/r50_ast.sh on the local CPU Slurm (scripts/slurm-local.sh):

- with its flagship defaults (experiment=r50_imagenet_ast: ResNet-50, bf16,
  channels_last, async checkpoints) and only the overrides a 2-CPU node needs, the job
  runs 2 steps, checkpoints, evaluates and exits 0;
- the demo on 2 ranks (one task running torchrun with 2 workers), stopped mid-run
  either by `scontrol requeue` (SIGTERM; Slurm requeues) or by the script's own
  time-limit path (USR1 to the batch shell, as `--signal=B:USR1@300` sends it; the
  workers save and exit 75, the script runs `scontrol requeue`), finishes with the same
  summary, weights, masks and BatchNorm statistics as an uninterrupted 2-rank run.

Skips (with the reason) when sbatch is missing or no slurmctld answers; CI sets
DIST_AST_REQUIRE_SLURM=1 (after starting the cluster) to fail instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import ckpt_utils as cu
from tests.slurm_utils import (
    exit_code,
    release,
    requeue,
    require_slurm,
    signal_batch,
    state,
    submit,
    wait,
)

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


# the #SBATCH lines ask for 4 nodes x 8 GPUs; the local cluster is one 2-CPU node
CPU_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]


def _submit_r50(tmp_path: Path, env: dict[str, str], script_args: list[str], name: str) -> int:
    return submit(
        cu.REPO / "slurm" / "r50_ast.sh",
        args=[*CPU_NODE, f"--output={tmp_path / 'slurm.out'}", f"--job-name=dist_ast-test-{name}"],
        env={
            "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(cu.REPO),
            "RUN_DIR": str(tmp_path / "run"),
            **env,
        },
        cwd=cu.REPO,
        script_args=script_args,
    )


@pytest.mark.timeout(300)
def test_sbatch_flagship_defaults_run_two_steps(tmp_path):
    """`sbatch slurm/r50_ast.sh` as the README gives it, plus what a CPU node needs."""
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    overrides = [
        "data=synthetic",
        "data.image_size=64",  # ResNet-50 as shipped (224² stem), 1000 classes
        "data.synthetic_size=400",  # 200 steps/epoch: the shipped schedule stays valid
        "train.batch_size=2",
        "train.stop_after_steps=2",
    ]
    job = _submit_r50(tmp_path, {"DEVICE": "cpu"}, overrides, "flagship")
    try:
        final = wait(job, timeout=270)
    except BaseException:
        os.system(f"scancel {job}")
        raise
    log = out.read_text() if out.exists() else "(no output)"
    assert final == "COMPLETED" and exit_code(job) == "0:0", log[-3000:]
    assert "rendezvous on" in log and "done (exit 0)" in log, log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1, summary
    assert [s["target_sparsity"] for s in summary["subnets"]] == [0.8, 0.9, 0.95]
    assert all(s["top1"] is not None for s in summary["subnets"])  # evaluated
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["name"] == "resnet50" and config["ast"]["initial_sparsity"] == 0.5
    t, c = config["train"], config["checkpoint"]
    assert (t["precision"], t["channels_last"], c["async_save"]) == ("bf16", True, True)
    assert (run_dir / "checkpoints" / "step-2").is_dir()  # the async save of the last step


def _demo_job(tmp_path: Path, name: str) -> int:
    overrides = [o for o in cu.SHORT if not o.startswith(("experiment=", "train.device="))]
    env = {"EXPERIMENT": "demo", "GPUS_PER_NODE": "2", "DEVICE": "cpu"}
    return _submit_r50(tmp_path, env, overrides, name)


def _wait_first_checkpoint(job: int, run_dir: Path, out: Path) -> None:
    cu.wait_until(
        # transient states (CONFIGURING, COMPLETING, "") must not end the wait
        lambda: (run_dir / "checkpoints" / "step-8").is_dir() or state(job) in FINISHED,
        timeout=240,
        what="the first checkpoint",
        poll=0.1,
    )
    assert (run_dir / "checkpoints" / "step-8").is_dir(), out.read_text()[-3000:]
    assert state(job) == "RUNNING", out.read_text()[-3000:]


def test_sbatch_requeue_mid_run_resumes_to_the_same_result(tmp_path, tmp_path_factory):
    reference = cu.reference_run(2, tmp_path_factory)
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = _demo_job(tmp_path, "resume")
    try:
        _wait_first_checkpoint(job, run_dir, out)
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


def test_sbatch_time_limit_usr1_requeues_itself_and_resumes(tmp_path, tmp_path_factory):
    """The script's own path: USR1 to the batch shell only (what --signal=B:USR1@300 does),
    the trap hands it to srun -> torchrun -> workers, they save and exit 75, and the
    script runs `scontrol requeue` itself; the requeued job resumes and finishes."""
    reference = cu.reference_run(2, tmp_path_factory)
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = _demo_job(tmp_path, "usr1")
    try:
        _wait_first_checkpoint(job, run_dir, out)
        signal_batch(job, "USR1")
        # the script requeues the job (PENDING, held by Slurm's BeginTime), or it ended
        cu.wait_until(lambda: state(job) in {"PENDING", *FINISHED}, timeout=200, what="the requeue")
        assert state(job) == "PENDING", out.read_text()[-3000:]
        release(job)
        final = wait(job, timeout=400)
    except BaseException:
        os.system(f"scancel {job}")
        raise
    log = out.read_text()
    assert final == "COMPLETED" and exit_code(job) == "0:0", log[-3000:]
    assert "caught SIGUSR1" in log and "preempted by SIGUSR1: saved step" in log, log[-3000:]
    assert "requeueing job" in log and "restart 1:" in log and "resumed from" in log
    cu.assert_same_run(reference, run_dir)
