"""The launchers' own logic without a cluster: slurm/r50_ast.sh run by bash with fake
`srun`, `scontrol` and Python on the PATH (what srun is given, where the rendezvous is,
the USR1 → save → requeue path), and the sbatch script launch/submit.py has submitit
write. The same paths on a real (local) Slurm: tests/test_slurm_*.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "r50_ast.sh"

# srun: record the arguments, then run the command (the first non-option argument) as the
# one task of a step on two nodes of a bigger job; exec, so signals reach the task.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
while [[ $1 == -* ]]; do shift; done
export SLURM_STEP_NODELIST='stepnode[2-3]' SLURM_NODEID=0 SLURM_STEP_ID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [[ $1 == show && $2 == hostnames ]]; then
  case $3 in
    'stepnode[2-3]') printf 'stepnode2\\nstepnode3\\n' ;;
    *) printf 'jobnode1\\njobnode2\\njobnode3\\n' ;;
  esac
fi
"""
# "python": record the arguments; FAKE_MODE=preempt waits for USR1 and exits 75 (as the
# workers do after saving), otherwise exits FAKE_RC.
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/python.args"
if [[ ${FAKE_MODE:-} == preempt ]]; then
  trap 'echo USR1 >> "$FAKE_LOG/python.signals"; exit 75' USR1
  touch "$FAKE_LOG/ready"
  while true; do sleep 0.05; done
fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_cluster(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("py", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(logs),
        "PYTHON": str(bin_dir / "py"),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "jobnode[1-3]",
        "SLURM_JOB_NUM_NODES": "2",
    }
    return env, logs


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_r50_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize(
    ("cpus", "want"),
    [
        ({"SLURM_CPUS_PER_TASK": "7"}, "--cpus-per-task=7"),
        ({"SLURM_CPUS_PER_TASK": "7", "SRUN_CPUS_PER_TASK": "5"}, "--cpus-per-task=5"),
        ({}, None),
    ],
)
def test_srun_gets_the_allocation_cpus_and_rendezvous_on_the_step_head(
    fake_cluster: tuple[dict[str, str], Path], cpus: dict[str, str], want: str | None
) -> None:
    env, logs = fake_cluster
    r = _run({**env, **cpus}, "data.root=/d", "train.batch_size=8")
    assert r.returncode == 0, r.stdout + r.stderr
    srun = _lines(logs / "srun.args")
    assert "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    assert [a for a in srun if a.startswith("--cpus-per-task")] == ([want] if want else [])
    py = _lines(logs / "python.args")
    # the head node is the step's first node, not the job's (jobnode1)
    assert py[:3] == ["-m", "torch.distributed.run", "--rdzv_endpoint=stepnode2:29734"]
    assert "--nnodes=2" in py and "--nproc_per_node=1" in py and "--rdzv_id=1234" in py
    i = py.index("dist_ast.train")
    assert py[i + 1 :] == [
        "experiment=r50_imagenet_ast",
        "run_dir=runs/r50_imagenet_ast-1234",
        "data.root=/d",
        "train.batch_size=8",
    ]
    assert "rendezvous on stepnode2:29734 (step nodes stepnode[2-3])" in r.stdout


def test_worker_exit_code_is_the_job_exit_code(fake_cluster: tuple[dict[str, str], Path]) -> None:
    env, logs = fake_cluster
    r = _run({**env, "FAKE_RC": "3"})
    assert r.returncode == 3 and "done (exit 3)" in r.stdout
    assert not any("requeue" in c for c in _lines(logs / "scontrol.calls"))


def test_usr1_before_the_time_limit_saves_and_requeues(
    fake_cluster: tuple[dict[str, str], Path],
) -> None:
    """--signal=B:USR1@300 signals the batch shell only; the script passes it on to the
    step, the workers exit 75 after saving, and the script requeues its own job."""
    env, logs = fake_cluster
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env={**env, "FAKE_MODE": "preempt"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (logs / "ready").exists():  # the worker runs: the traps are in place
            assert proc.poll() is None and time.monotonic() < deadline, "worker never started"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert _lines(logs / "python.signals") == ["USR1"]
    assert "caught SIGUSR1" in out and "preempted (srun exit 75): requeueing job 1234" in out
    assert "requeue 1234" in _lines(logs / "scontrol.calls")


def test_submit_py_srun_gets_cpus_per_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from launch.submit import build_executor, parse

    args, overrides = parse(
        ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--log-dir"]
        + [str(tmp_path / "%j"), "--", "experiment=demo"]
    )
    assert overrides == ["experiment=demo", "run_dir=runs/demo-submitit"]
    executor = build_executor(args)
    assert executor.cluster == "slurm"  # also on a machine without Slurm: no silent fallback
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --cpus-per-task=6" in text and "#SBATCH --ntasks-per-node=4" in text
    srun = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=6" in srun[0].split(), text


def test_submit_py_help_documents_wait() -> None:
    r = subprocess.run(
        [sys.executable, "launch/submit.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--wait" in r.stdout, r.stderr
