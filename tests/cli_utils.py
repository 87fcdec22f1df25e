"""The command line as users run it, and the one-line error format its failures keep."""

from __future__ import annotations

import subprocess

from dist_ast.distributed.setup import free_port
from tests.ckpt_utils import PY, REPO, env

TINY = ["experiment=demo", "model.width=8", "train.progress=false", "train.max_steps=16"]


def dist_ast_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "dist_ast.train", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_one_line(proc: subprocess.CompletedProcess, code: int, kind: str, *words: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dist_ast: ")]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"dist_ast: {kind}: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def torchrun(module: str, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m <module> <args>`` (2 gloo ranks), as users launch it."""
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    return subprocess.run(
        [*cmd, "-m", module, *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
