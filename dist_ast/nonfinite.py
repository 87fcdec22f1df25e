"""The non-finite guard: a diverged run stops (or skips the step) before it saves NaN
weights or ranks NaN scores.

Per step the guard folds "is the loss or any gradient inf/nan" into a device flag, read
where the trainer already synchronizes (log steps, before a save or a mask update, at the
end) under ``train.nonfinite=stop``. ``skip`` must decide before the optimizer step, so
it reads the flag every step (DESIGN §2's one allowed host read) and stops after
``train.max_skipped`` consecutive skips. The flag comes from all-reduced gradients, so
every rank decides alike at the same step.
"""

from __future__ import annotations

import math

import torch

from dist_ast.errors import EXIT_NONFINITE, ExpectedError
from dist_ast.state_codecs import IntCounters


class NonFiniteError(ExpectedError):
    """The loss or a gradient became inf/nan; names the step, sub-net and loss."""

    exit_code = EXIT_NONFINITE
    kind = "non-finite"
    same_on_every_rank = True


def nonfinite(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Device bool: the loss or any gradient holds inf/nan (max-abs norms: no overflow)."""
    bad = ~torch.isfinite(loss.detach().float()).all()
    if grads:
        norms = torch._foreach_norm(grads, ord=math.inf)
        bad = bad | ~torch.isfinite(torch.stack(norms).float()).all()
    return bad


class NonFiniteGuard(IntCounters):
    """Remembers the first bad step on the device; ``check`` reads it (one host read)."""

    int_fields = ("skipped", "consecutive")

    def __init__(self, policy: str, max_skipped: int, device: torch.device) -> None:
        self.policy, self.max_skipped = policy, max_skipped
        self.first = torch.full((3,), -1.0, dtype=torch.float64, device=device)
        self.skipped = 0  # steps skipped in all (skip policy), in metrics.jsonl
        self.consecutive = 0

    def observe(self, step: int, subnet: int, loss: torch.Tensor, bad: torch.Tensor) -> None:
        """Keep (step, sub-net, loss) of the first bad step: device ops with the step and
        sub-net as kernel scalars, so no host read and no host-to-device copy."""
        fresh = bad & (self.first[0] < 0)
        self.first[0] = torch.where(fresh, float(step), self.first[0])
        self.first[1] = torch.where(fresh, float(subnet), self.first[1])
        self.first[2] = torch.where(fresh, loss.detach().double().reshape(()), self.first[2])

    def check(self, newest_good: str) -> None:
        """Raise NonFiniteError if a bad step was seen (stop policy)."""
        step, subnet, loss = self.first.tolist()
        if step < 0:
            return
        raise NonFiniteError(
            f"step {int(step)} (sub-net {int(subnet)}): the loss ({loss}) or a gradient is "
            "not finite (train.nonfinite=stop). Nothing was saved after it; the newest good "
            f"checkpoint is {newest_good}. Lower optim.lr (or check the data), then resume "
            "from it with the same command, or set train.nonfinite=skip"
        )

    def skip(self, step: int, subnet: int, loss: torch.Tensor, bad: torch.Tensor) -> bool:
        """Skip policy: whether this step is dropped (reads ``bad``: one host read)."""
        if not bool(bad):
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_skipped:
            raise NonFiniteError(
                f"step {step} (sub-net {subnet}): {self.consecutive} consecutive steps with a "
                f"non-finite loss or gradient (loss {float(loss)}), more than "
                f"train.max_skipped={self.max_skipped}: the run diverged. Lower optim.lr and "
                "resume from the newest checkpoint with the same command"
            )
        return True
