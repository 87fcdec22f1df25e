"""Gradient correction on consecutive inner-group sub-nets (DESIGN §1.9, paper Eq. 5).

The math is one pure function over the gradient as a list of per-layer tensors (the
same arithmetic as one flat vector, without the copy); the small class around it
holds g_prev and the counters of paper Fig. 4.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l a_l·b_l accumulated in float64, so a corrected g is orthogonal to ĝ to ~1e-12."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device if a else "cpu")
    for x, y in zip(a, b, strict=True):
        total += torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
    return total


def project_conflict(
    grads: list[torch.Tensor],
    prev: list[torch.Tensor],
    masks: list[torch.Tensor],
    *,
    reduce_group: object | None = None,
) -> tuple[list[torch.Tensor], float]:
    """If g·ĝ < 0 with ĝ = g_prev ⊙ m_k, return g − (g·ĝ/‖ĝ‖²) ĝ, else g; and g·ĝ.

    ``grads`` must already be supported on m_k, so the result is too. With
    ``reduce_group`` the two partial scalars are all-reduced first (ZeRO-2, where each
    rank holds a partition of the gradient).
    """
    g_hat = [p * m for p, m in zip(prev, masks, strict=True)]
    stats = torch.stack([_dot(grads, g_hat), _dot(g_hat, g_hat)])
    if reduce_group is not None:
        dist.all_reduce(stats, group=reduce_group)  # type: ignore[arg-type]
    dot, norm_sq = float(stats[0]), float(stats[1])
    if dot >= 0 or norm_sq == 0.0:
        return grads, dot
    coef = dot / norm_sq
    return [g - (coef * h).to(g.dtype) for g, h in zip(grads, g_hat, strict=True)], dot


class GradientCorrection:
    """Inner-group GC state: the previous update direction and the conflict counters."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prev: list[torch.Tensor] | None = None
        self.steps_checked = 0  # steps where a previous direction existed (not group starts)
        self.conflicts = 0  # of those, steps with g·ĝ < 0 (corrected when enabled)

    def __call__(
        self,
        grads: list[torch.Tensor],
        masks: list[torch.Tensor],
        group_start: bool,
        reduce_group: object | None = None,
    ) -> tuple[list[torch.Tensor], bool]:
        """Return (the gradient to apply, whether it conflicted); updates g_prev."""
        conflicted = False
        if not group_start and self.prev is not None:
            corrected, dot = project_conflict(grads, self.prev, masks, reduce_group=reduce_group)
            self.steps_checked += 1
            conflicted = dot < 0
            self.conflicts += int(conflicted)
            if self.enabled:
                grads = corrected
        self.prev = [g.detach().float().clone() for g in grads]
        return grads, conflicted

    def state_dict(self) -> dict:
        return {
            "prev": self.prev,
            "steps_checked": self.steps_checked,
            "conflicts": self.conflicts,
        }

    def load_state_dict(self, state: dict) -> None:
        self.prev = state["prev"]
        self.steps_checked = int(state["steps_checked"])
        self.conflicts = int(state["conflicts"])
