"""Schedules as pure functions of the global step: alternation, sparsity ramp, regrowth.

Resuming needs only the step (and the masks themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_ast.sparsity.masks import density_count


def cubic_sparsity(
    step: float, *, final: float, initial: float, ramp_start: int, ramp_end: int
) -> float:
    """GraNet's cubic ramp: s_i at ramp_start, exactly ``final`` from ramp_end on."""
    if step <= ramp_start:
        return initial
    if step >= ramp_end:
        return final
    progress = (step - ramp_start) / (ramp_end - ramp_start)
    return final + (initial - final) * (1.0 - progress) ** 3


def regrow_fraction(step: float, *, total_steps: int, initial: float, minimum: float) -> float:
    """r(t) = r_min + (r_0 - r_min)(1 + cos(pi t / T)) / 2."""
    t = min(max(step, 0.0), total_steps)
    return minimum + (initial - minimum) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


@dataclass(frozen=True)
class SparsitySchedule:
    """When each sub-net trains and when it changes its mask, in global steps.

    Sub-net 0's mask updates are scheduled at ramp_start + j·ΔT; sub-net k's at the same
    steps + k·Δτ (global steps, unlike the authors' code, which counts the sub-net's own
    steps). In alternating training the update happens at the first step at or after the
    scheduled one on which k is the active sub-net, because regrowth needs the dense
    gradient of k's own forward pass.
    """

    sparsities: tuple[float, ...]
    initial_sparsity: float
    total_steps: int
    ramp_start: int
    ramp_end: int
    update_every: int
    stagger: int
    update_end: int
    regrow_initial: float = 0.5
    regrow_min: float = 0.005
    alternating: bool = True

    def __post_init__(self) -> None:
        if self.stagger * (self.num_subnets - 1) >= self.update_every:
            raise ValueError("stagger*(N-1) must be < update_every")

    @property
    def num_subnets(self) -> int:
        return len(self.sparsities)

    def active_subnet(self, step: int) -> int:
        """Alternation: step t trains sub-net t mod N (joint training uses all)."""
        return step % self.num_subnets

    def is_group_start(self, step: int) -> bool:
        """First step of an inner group gN … gN+N-1."""
        return step % self.num_subnets == 0

    def target_sparsity(self, subnet: int, step: float) -> float:
        return cubic_sparsity(
            step,
            final=self.sparsities[subnet],
            initial=self.initial_sparsity,
            ramp_start=self.ramp_start,
            ramp_end=self.ramp_end,
        )

    def target_count(self, subnet: int, step: float, total: int) -> int:
        return density_count(1.0 - self.target_sparsity(subnet, step), total)

    def ramp_on(self, subnet: int, step: int) -> bool:
        """Whether ``subnet``'s update carried out at ``step`` was scheduled inside the
        ramp (its j-th update counts as the ramp's j-th pruning, as in the authors' code)."""
        j = (step - self.ramp_start - subnet * self.stagger) // self.update_every
        return self.ramp_start + j * self.update_every <= self.ramp_end

    def regrow_fraction(self, step: float) -> float:
        return regrow_fraction(
            step, total_steps=self.total_steps, initial=self.regrow_initial, minimum=self.regrow_min
        )

    def scheduled_updates(self, subnet: int) -> list[int]:
        """Sub-net ``subnet``'s scheduled update steps (before moving to its own step)."""
        first = self.ramp_start + subnet * self.stagger
        return list(range(first, self.update_end, self.update_every))

    def update_step(self, subnet: int, scheduled: int) -> int:
        """The step that carries out an update scheduled at ``scheduled``."""
        if not self.alternating:
            return scheduled
        n = self.num_subnets
        return scheduled + (subnet - scheduled) % n

    def updates_at(self, step: int) -> list[int]:
        """Sub-nets whose mask update is carried out at ``step`` (at most one when alternating)."""
        if step >= self.update_end + self.num_subnets or step < self.ramp_start:
            return []
        candidates = [self.active_subnet(step)] if self.alternating else range(self.num_subnets)
        out = []
        for k in candidates:
            first = self.ramp_start + k * self.stagger
            window = self.num_subnets if self.alternating else 1
            # A scheduled step s = first + j·ΔT with step - window < s <= step and s < update_end.
            lo = step - window + 1
            j = max(0, -(-(lo - first) // self.update_every))
            s = first + j * self.update_every
            if s <= step and s < self.update_end and self.update_step(k, s) == step:
                out.append(k)
        return out

    def last_update_step(self, subnet: int) -> int | None:
        steps = [self.update_step(subnet, s) for s in self.scheduled_updates(subnet)]
        steps = [s for s in steps if s < self.total_steps]
        return steps[-1] if steps else None
