"""Preemption: a signal sets a flag, all ranks agree on it at the next step boundary,
save together and exit with the requeue code.

SIGTERM (Slurm preemption, ``scancel``, torchrun), SIGUSR1/SIGUSR2 (``sbatch --signal``,
submitit's ``USR2@90``) only set a flag: a save is collective, so it cannot run in one
rank's signal handler. At each step boundary the ranks all-reduce (MAX) [this rank's
flag, checkpoint-by-time due], so every rank saves at the same step.

``REQUEUE_EXIT_CODE = 75`` (``EX_TEMPFAIL``, "temporary failure, retry") differs from
success, a Python error, a config error and death by signal, so wrappers can tell "saved,
run me again" from a failure (``slurm/r50_ast.sh``, slurm.conf's ``RequeueExit``,
``launch/submit.py``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int, signum: int | None) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step
        self.signum = signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "a signal on another rank"
        return f"preempted by {name}: saved step {self.step}, exit {REQUEUE_EXIT_CODE} to requeue"


class PreemptionHandler:
    """Installs the flag-setting handlers; ``restore()`` puts the previous ones back."""

    def __init__(self, signals: Iterable[signal.Signals] = SIGNALS) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: nothing to install
                log.debug("cannot install a handler for %s outside the main thread", s)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()


def agree(flags: list[bool], group: object | None = None) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, in one all-reduce of a CPU
    tensor (gloo beside NCCL): it runs every step, and a GPU tensor would cost a copy and
    a read-back that waits for the GPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    return [bool(v) for v in t.tolist()]
