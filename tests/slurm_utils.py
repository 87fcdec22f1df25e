"""Helpers for tests that run real Slurm jobs (see scripts/slurm-local.sh, docs/slurm-local.md).

    from tests.slurm_utils import slurm_skip_reason, submit, wait, wait_for, requeue

    job = submit("slurm/r50_ast.sh", args=["-n", "2"], env={"DATA": ...}, cwd=tmp_path)
    wait_for(job, {"RUNNING"})          # or poll the job's output for a checkpoint
    requeue(job)                        # cancel + requeue, released at once
    signal_batch(job, "USR1"); release(job)   # the time-limit warning; the job requeues itself
    assert wait(job, timeout=300) == "COMPLETED"

The local cluster keeps no accounting (no sacct) and forgets finished jobs a few seconds
after they end (MinJobAge=4), so `wait` polls `scontrol` often and falls back to the
jobcomp/filetxt log for the final state.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

# states after which a job will not run again (unless requeued by hand)
TERMINAL = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)

_KV = re.compile(r"(\S+?)=(.*?)(?=\s+[A-Za-z:/]+=|\s*$)")


def _run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def require_slurm() -> None:
    """Skip the calling test with the reason when Slurm is not usable; fail instead when
    DIST_AST_REQUIRE_SLURM=1 (CI, which starts the cluster first)."""
    import pytest

    reason = slurm_skip_reason()
    if reason is not None:
        if os.environ.get("DIST_AST_REQUIRE_SLURM") == "1":
            pytest.fail(f"DIST_AST_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def slurm_skip_reason() -> str | None:
    """Why Slurm tests cannot run here, or None when a controller answers."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (run `sudo bash scripts/slurm-local.sh` to get a local cluster)"
    try:
        r = _run(["scontrol", "ping"], timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol ping` failed: {e}"
    if r.returncode != 0 or "UP" not in r.stdout:
        out = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[0]
        return f"`scontrol ping` failed (no slurmctld; run scripts/slurm-local.sh): {out}"
    return None


def submit(
    script: str | os.PathLike,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    script_args: Iterable[str] = (),
) -> int:
    """`sbatch --parsable [args] script [script_args]` -> job id.

    `script` is a path, or the script's text when it contains a newline (given on stdin).
    `env` is added to the current environment (sbatch exports it all to the job).
    """
    full_env = {**os.environ, **(env or {})}
    cmd = ["sbatch", "--parsable", *args]
    stdin = None
    if isinstance(script, str) and "\n" in script:
        stdin = script
        if list(script_args):
            raise ValueError("script_args need a script file, not script text")
    else:
        cmd += [os.fspath(script), *script_args]
    r = _run(cmd, input=stdin, env=full_env, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()} [{' '.join(cmd)}]")
    return int(r.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str] | None:
    """`scontrol show job` as a dict, or None when slurmctld no longer knows the job."""
    r = _run(["scontrol", "-o", "show", "job", str(job_id)])
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id}: {r.stderr.strip()}")
    line = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
    return {k: v for k, v in _KV.findall(line)} or None


def _jobcomp_path() -> Path | None:
    r = _run(["scontrol", "show", "config"])
    m = re.search(r"^JobCompLoc\s*=\s*(\S+)", r.stdout, re.M)
    return Path(m.group(1)) if m else None


def jobcomp_record(job_id: int) -> dict[str, str] | None:
    """The last jobcomp/filetxt record of a job (written when it ends or is requeued)."""
    path = _jobcomp_path()
    if path is None or not path.is_file():
        return None
    rec = None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(f"JobId={job_id} "):
            rec = dict(_KV.findall(line))
    return rec


def state(job_id: int) -> str | None:
    """Current state (e.g. PENDING, RUNNING, COMPLETED), None when unknown."""
    info = job_info(job_id)
    if info is not None:
        return info.get("JobState")
    rec = jobcomp_record(job_id)
    return rec.get("JobState") if rec else None


def wait_for(job_id: int, states: Iterable[str], timeout: float = 60, poll: float = 0.5) -> str:
    """Wait until the job is in one of `states` (or terminal); return that state."""
    want = set(states)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = state(job_id)
        if last in want or last in TERMINAL:
            return last
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} not in {sorted(want)} after {timeout} s (state {last})")


def wait(job_id: int, timeout: float = 120, poll: float = 0.5) -> str:
    """Wait until the job has ended; return its final state (COMPLETED, FAILED, ...)."""
    return wait_for(job_id, TERMINAL, timeout=timeout, poll=poll)


def exit_code(job_id: int) -> str | None:
    """The job's ExitCode ("0:0" = exit status:signal), from scontrol or the jobcomp log."""
    info = job_info(job_id) or jobcomp_record(job_id)
    return info.get("ExitCode") if info else None


def requeue(job_id: int, timeout: float = 60) -> None:
    """Requeue a running (or finished) job and release it at once.

    `scontrol requeue` sends SIGTERM to the job (SIGKILL KillWait=30 s later) and holds
    it ~2 minutes (BeginTime); `scontrol update StartTime=now` releases it. The rerun
    sees SLURM_RESTART_COUNT incremented; use --open-mode=append to keep both outputs.
    """
    r = _run(["scontrol", "requeue", str(job_id)])
    if r.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id}: {r.stderr.strip()}")
    release(job_id, timeout)


def _node_completing() -> bool:
    """The node still cleans up a job's last run (slurmd refuses to relaunch a requeued
    batch job until then: "Job N already killed, do not launch batch job")."""
    r = _run(["sinfo", "-h", "-N", "-o", "%T"])
    return "comp" in r.stdout.lower()


def release(job_id: int, timeout: float = 60) -> None:
    """Start a requeued job now instead of after Slurm's ~2 minute hold (BeginTime).

    Waits until the job is PENDING and the node has finished cleaning up its last run,
    then `scontrol update StartTime=now`; returns when
    that succeeded, or when the job runs again after a refused update."""
    deadline = time.monotonic() + timeout
    err = ""
    pending_since = None
    while time.monotonic() < deadline:
        st = state(job_id)
        if st == "PENDING" and pending_since is None:
            pending_since = time.monotonic()
        # slurmd revokes a killed job's credentials with 1 s granularity: a relaunch in the
        # same second as the requeue is refused ("Job credential revoked", the job FAILS).
        # Slurm's own ~2 minute BeginTime hold exists for this; 2 s is enough.
        settled = pending_since is not None and time.monotonic() - pending_since >= 2.0
        if st == "PENDING" and settled and not _node_completing():
            r = _run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])
            if r.returncode == 0:
                return
            err = r.stderr.strip()
        elif st == "RUNNING" and err:  # released by something else
            return
        time.sleep(0.25)
    raise TimeoutError(f"could not release requeued job {job_id} within {timeout} s: {err}")


def signal_batch(job_id: int, sig: str = "USR1") -> None:
    """Signal only the job's batch shell, as `#SBATCH --signal=B:<sig>@<t>` does before the
    time limit (`scancel --batch`: the shell gets it, its children and steps do not)."""
    r = _run(["scancel", f"--signal={sig}", "--batch", str(job_id)])
    if r.returncode != 0:
        raise RuntimeError(f"scancel --signal={sig} --batch {job_id}: {r.stderr.strip()}")
