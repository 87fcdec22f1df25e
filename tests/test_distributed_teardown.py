"""Leaving the process group (``leave_together``) on 2 gloo ranks: ranks that end together
meet before they destroy it; a rank that failed alone leaves at once and its peer is not
stuck waiting for it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from test_distributed_ddp import spawn  # tests/ is on sys.path under pytest

from dist_ast.distributed.setup import free_port, leave_together

pytestmark = pytest.mark.distributed


class Stop(Exception):
    """An exception every rank raises at the same point, like preemption."""


def _scenario(rank: int, port: int, ending: str, slow_rank: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out: dict = {}
    try:
        with leave_together(agreed=(Stop,)):
            if rank == slow_rank:
                time.sleep(1.0)
            out["block_end"] = time.time()
            if ending == "agreed":
                raise Stop
            if ending == "failed" and rank == 1:
                raise ValueError("only rank 1 fails")
    except (Stop, ValueError) as e:
        out["raised"] = type(e).__name__
    out["left"] = time.time()
    out["initialized"] = dist.is_initialized()
    return out


def _worker(rank: int, world: int, port: int, out: str, ports: list[int]) -> None:
    results = {
        "normal": _scenario(rank, port, "normal", slow_rank=1),
        "agreed": _scenario(rank, ports[0], "agreed", slow_rank=1),
        "failed": _scenario(rank, ports[1], "failed", slow_rank=0),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))


def test_leave_together_meets_on_success_and_agreed_errors_only(tmp_path: Path) -> None:
    spawn(_worker, str(tmp_path), [free_port(), free_port()], timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for case in ("normal", "agreed", "failed"):
        assert not r0[case]["initialized"] and not r1[case]["initialized"], case
    # Rank 1 finished its block a second late: rank 0 waited for it before leaving.
    assert r0["normal"]["left"] >= r1["normal"]["block_end"]
    assert r0["agreed"]["raised"] == r1["agreed"]["raised"] == "Stop"
    assert r0["agreed"]["left"] >= r1["agreed"]["block_end"]
    # Rank 1 failed alone: it left without waiting for rank 0 (still asleep in its block),
    # and rank 0 then left too instead of hanging in the barrier (warning, no error).
    assert r1["failed"]["raised"] == "ValueError" and "raised" not in r0["failed"]
    assert r1["failed"]["left"] < r0["failed"]["block_end"]
