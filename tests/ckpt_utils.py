"""Shared helpers of the checkpoint / preemption / Slurm-resume tests: a short demo run
as a subprocess (the real command line), waiting on its progress, and comparing two
finished runs (summary.json without wall time, model.pt tensors, metrics.jsonl).

Timeouts: one short run takes 5-30 s on a loaded 2-core machine; each wait here gives
up after at most 180 s, so a hang fails with what it waited for well before pytest's
600 s (a test whose waits add up to more says so with its own timeout mark)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dist_ast.distributed.setup import free_port

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# 24 steps of the demo (3 sub-nets): mask updates at steps 12 (k=0), 16 (k=1), 20 (k=2),
# a checkpoint every 8 steps, metrics every step (so a kill lands at a known step).
SHORT = [
    "experiment=demo",
    "train.progress=false",
    "train.device=cpu",
    "train.max_steps=24",
    "train.log_every=1",
    "ast.ramp_end_epoch=0.5",
    "ast.update_every=12",
    "ast.stagger=4",
    "checkpoint.every_steps=8",
]


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def merged(*overrides: str) -> list[str]:
    """SHORT with ``overrides`` on top (a later key replaces an earlier one: Hydra refuses
    the same key twice)."""
    out: dict[str, str] = {}
    for o in (*SHORT, *overrides):
        out[o.split("=", 1)[0]] = o
    return list(out.values())


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [PY, "-m", "dist_ast.train", *merged(f"run_dir={run_dir}", *overrides)]


def run_train(run_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(
        train_cmd(run_dir, *overrides),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def spawn_ranks(
    run_dir: Path, world: int, *overrides: str, log_dir: Path
) -> list[subprocess.Popen]:
    """``world`` training processes joined over gloo, as srun or torchrun would start them."""
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        e = env()
        e.update(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        out = open(log_dir / f"rank{r}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                train_cmd(run_dir, *overrides),
                cwd=REPO,
                env=e,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def start_train(run_dir: Path, *overrides: str, log: Path | None = None) -> subprocess.Popen:
    """The training command as a child process (output to ``log``, or discarded)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child
    return subprocess.Popen(
        train_cmd(run_dir, *overrides), cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT
    )


def signal_when(
    proc: subprocess.Popen,
    run_dir: Path,
    ready,  # noqa: ANN001 - a predicate on the run folder
    what: str,
    sig: int = signal.SIGKILL,
    timeout: float = 120,
) -> int:
    """Send ``sig`` to ``proc`` once ``ready(run_dir)`` holds; its exit code. Fails if the
    run ended on its own before that (the test would not test what it says)."""
    try:
        wait_until(lambda: ready(run_dir) or proc.poll() is not None, timeout, what, poll=0.02)
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill9_when(run_dir: Path, overrides: tuple[str, ...], ready, what: str) -> None:  # noqa: ANN001
    """Start the training command, SIGKILL it once ``ready(run_dir)`` holds; the run must
    not have finished on its own."""
    code = signal_when(start_train(run_dir, *overrides), run_dir, ready, what)
    assert code == -signal.SIGKILL, f"exit code {code}"


def last_step(run_dir: Path) -> int:
    """The last training step metrics.jsonl records (log_every=1)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass
    return max(steps)


def wait_until(pred, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def summary(run_dir: Path) -> dict:
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    s.pop("wall_seconds")  # the only field that may differ between two equal runs
    return s


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


def assert_same_model(a: Path, b: Path) -> None:
    """Weights, masks (bool buffers) and every BatchNorm set's statistics, bit for bit."""
    ma, mb = model_tensors(a), model_tensors(b)
    assert ma.keys() == mb.keys()
    assert any(k.endswith("masks") for k in ma) and any("running_mean" in k for k in ma)
    diff = [k for k in ma if not torch.equal(ma[k], mb[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


def assert_same_run(a: Path, b: Path) -> None:
    assert summary(a) == summary(b)
    assert_same_model(a, b)
    assert (Path(a) / "metrics.jsonl").read_text() == (Path(b) / "metrics.jsonl").read_text()


_REFERENCES: dict[int, Path] = {}


def reference_run(world: int, tmp_path_factory) -> Path:  # noqa: ANN001 - pytest's factory
    """The uninterrupted SHORT run on ``world`` ranks, made once per test session (the
    preemption and the Slurm tests compare against the same 2-rank run)."""
    if world not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp(f"ref{world}") / "run"
        if world == 1:
            run_train(run_dir)
        else:
            procs = spawn_ranks(run_dir, world, log_dir=run_dir.parent / "logs")
            try:
                codes = [p.wait(timeout=180) for p in procs]
            finally:
                for p in procs:
                    p.kill()
            assert codes == [0] * world, codes
        _REFERENCES[world] = run_dir
    return _REFERENCES[world]
