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

from dist_ast.distributed.setup import free_port, leave_together
from tests.dist_utils import spawn

pytestmark = pytest.mark.distributed


WAIT_S = 60  # a wait that ends only on a bug (the awaited event never comes)


class Stop(Exception):
    """An exception every rank raises at the same point, like preemption."""


class Events:
    """Cross-process events as files: ``mark`` one, ``wait`` for one (True if it came)."""

    def __init__(self, out: str, case: str) -> None:
        self.dir, self.case = Path(out), case

    def path(self, name: str) -> Path:
        return self.dir / f"{self.case}.{name}"

    def mark(self, name: str) -> None:
        self.path(name).touch()

    def wait(self, name: str, timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not self.path(name).exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _scenario(rank: int, port: int, out: str, ending: str, slow_rank: int) -> dict:
    """The slow rank stays in its block until an event proves the other rank is past
    its own: rank 0 inside the leaving barrier (the block ended normally or by an agreed
    exception), or rank 1 gone (it failed alone). No sleeps: the order is forced."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ev = Events(out, ending)
    real_barrier = dist.monitored_barrier

    def spy_barrier(*args, **kwargs):  # what leave_together calls on gloo
        ev.mark(f"rank{rank}-in-barrier")
        return real_barrier(*args, **kwargs)

    dist.monitored_barrier = spy_barrier
    out_: dict = {}
    try:
        with leave_together(agreed=(Stop,)):
            if rank == slow_rank:
                peer = "rank0-in-barrier" if ending != "failed" else "rank1-left"
                out_["peer_event_came"] = ev.wait(peer)
            out_["block_end"] = time.monotonic()
            if ending == "agreed":
                raise Stop
            if ending == "failed" and rank == 1:
                raise ValueError("only rank 1 fails")
    except (Stop, ValueError) as e:
        out_["raised"] = type(e).__name__
    finally:
        dist.monitored_barrier = real_barrier
    out_["left"] = time.monotonic()  # CLOCK_MONOTONIC: one clock for both processes
    ev.mark(f"rank{rank}-left")
    out_["initialized"] = dist.is_initialized()
    out_["entered_barrier"] = ev.path(f"rank{rank}-in-barrier").exists()
    return out_


def _worker(rank: int, world: int, port: int, out: str, ports: list[int]) -> None:
    results = {
        "normal": _scenario(rank, port, out, "normal", slow_rank=1),
        "agreed": _scenario(rank, ports[0], out, "agreed", slow_rank=1),
        "failed": _scenario(rank, ports[1], out, "failed", slow_rank=0),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.timeout(300)
def test_leave_together_meets_on_success_and_agreed_errors_only(tmp_path: Path) -> None:
    spawn(_worker, str(tmp_path), [free_port(), free_port()], timeout=240)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for case in ("normal", "agreed", "failed"):
        assert not r0[case]["initialized"] and not r1[case]["initialized"], case
    for case in ("normal", "agreed"):
        # rank 1 stayed in its block until rank 0 was in the barrier, and rank 0 left
        # only after rank 1's block ended: it waited for it
        assert r1[case]["peer_event_came"], f"{case}: rank 0 never entered the barrier"
        assert r0[case]["entered_barrier"] and r1[case]["entered_barrier"], case
        assert r0[case]["left"] >= r1[case]["block_end"], case
    assert r0["agreed"]["raised"] == r1["agreed"]["raised"] == "Stop"
    # Rank 1 failed alone: it left without a barrier while rank 0 was still in its
    # block, and rank 0 then left too instead of hanging in the barrier (warning only).
    assert r1["failed"]["raised"] == "ValueError" and "raised" not in r0["failed"]
    assert r0["failed"]["peer_event_came"], "rank 1 did not leave while rank 0 was busy"
    assert not r1["failed"]["entered_barrier"]
    assert r1["failed"]["left"] < r0["failed"]["block_end"]
