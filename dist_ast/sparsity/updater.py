"""Mask decisions for a SubnetModel: initial masks and one sub-net's update.

``decide`` is the pure part (rank 0 runs it); ``apply`` installs the masks on every
rank and starts newly grown connections at zero with zero momentum (or, with
``regrow_init="kept"`` as in the authors' code, at their frozen shared value).
"""

from __future__ import annotations

import torch

from dist_ast.sparsity import nm
from dist_ast.sparsity.masks import random_masks
from dist_ast.sparsity.model import SubnetModel
from dist_ast.sparsity.nm import check_nm_patterns
from dist_ast.sparsity.optim import MaskedSGD
from dist_ast.sparsity.prune_regrow import global_magnitude_prune, prune_and_regrow
from dist_ast.sparsity.schedule import SparsitySchedule, cubic_sparsity


def initial_masks(model: SubnetModel, initial_sparsity: float, seed: int) -> list[torch.Tensor]:
    """One random mask with exactly round((1 - s_i)·total) live weights over all sparse
    layers, shared by every sub-net: AST starts from one random sparse model."""
    generator = torch.Generator().manual_seed(seed)
    return random_masks(model.sparse_weights(), 1.0 - initial_sparsity, generator)


class MaskUpdater:
    """Carries out sub-net k's prune-and-regrow at the steps the schedule names."""

    def __init__(
        self,
        model: SubnetModel,
        schedule: SparsitySchedule,
        completely_subset: bool = False,
        nm_patterns: list[str] | None = None,
        regrow_init: str = "zero",
        inactive_weights: str = "frozen",
        prune_scope: str = "subnet",
    ) -> None:
        if regrow_init not in ("zero", "kept"):
            raise ValueError(f"regrow_init must be zero or kept, not {regrow_init!r}")
        if prune_scope not in ("subnet", "shared"):
            raise ValueError(f"prune_scope must be subnet or shared, not {prune_scope!r}")
        self.prune_scope = prune_scope
        self.model = model
        # A fresh weight (regrown, live in no other sub-net) starts at 0 (zero) or keeps
        # its value (kept). Its momentum is zeroed, except kept + inactive_weights=moving:
        # there the buffer moved every step like the weight (the authors' code touches
        # neither), whereas a frozen buffer is stale from when the weight left every
        # sub-net and should not push it.
        self.zero_weight = regrow_init == "zero"
        self.zero_momentum = self.zero_weight or inactive_weights == "frozen"
        self.schedule = schedule
        self.completely_subset = completely_subset
        self.total = sum(w.numel() for w in model.sparse_weights())
        self.nm_patterns = list(nm_patterns) if nm_patterns else None
        if self.nm_patterns:  # the config's check, for an updater built without a RunConfig
            relation = "completely_subset" if completely_subset else "non_disjoint"
            sparsities, initial = list(schedule.sparsities), schedule.initial_sparsity
            check_nm_patterns(self.nm_patterns, sparsities, initial, relation)

    def nm_fraction(self, step: float) -> float:
        """Scheduled fraction of N:M groups: 0 at ramp start, 1 from ramp end (cubic)."""
        s = self.schedule
        return cubic_sparsity(
            step, final=1.0, initial=0.0, ramp_start=s.ramp_start, ramp_end=s.ramp_end
        )

    def init_masks(self, seed: int) -> None:
        masks = initial_masks(self.model, self.schedule.initial_sparsity, seed)
        for k in range(self.model.num_subnets):
            self.model.set_masks(k, masks)

    @torch.no_grad()
    def decide(self, k: int, step: int, dense_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sub-net k's new masks at ``step`` from the all-reduced dense gradient."""
        weights = self.model.sparse_weights()
        fraction = self.schedule.regrow_fraction(step)
        if self.nm_patterns:
            groups, grads = self.nm_fraction(step), dense_grads or [None] * len(weights)
            return [
                nm.nm_update(
                    w, m, g, self.nm_patterns[k], fraction=groups, regrow_fraction=fraction
                )
                for w, m, g in zip(weights, self.model.masks(k), grads, strict=True)
            ]
        target = self.schedule.target_count(k, step, self.total)
        n = self.model.num_subnets
        protect = self.model.masks(k + 1) if self.completely_subset and k + 1 < n else None
        if self.completely_subset and k > 0:
            # CS: sparser sub-nets only prune, inside the next denser one (S-Net style).
            return global_magnitude_prune(weights, self.model.masks(k - 1), target, protect)
        candidates = self.model.masks(k)
        if self.prune_scope == "shared" and self.schedule.ramp_on(k, step):
            # the authors' scheduled pruning: the top |w| of the whole shared tensor
            candidates = [torch.ones_like(m) for m in candidates]
        return prune_and_regrow(
            weights,
            candidates,
            dense_grads,
            target_count=target,
            regrow_fraction=fraction,
            protect=protect,
        )

    @torch.no_grad()
    def apply(self, k: int, new_masks: list[torch.Tensor], optimizer: MaskedSGD | None) -> int:
        """Install sub-net k's masks; returns how many grown weights are fresh (live in no
        other sub-net: reset as __init__ says; others keep their shared value and momentum)."""
        others = [j for j in range(self.model.num_subnets) if j != k]
        reset = 0
        for i, (w, old, new) in enumerate(
            zip(self.model.sparse_weights(), self.model.masks(k), new_masks, strict=True)
        ):
            fresh = new & ~old
            for j in others:
                fresh &= ~self.model.masks(j)[i]
            if fresh.any():
                if self.zero_weight:
                    # DeepSpeed's reset_state zeroes the fp32 master copy as well
                    w.masked_fill_(fresh, 0.0)
                    if optimizer is not None:
                        optimizer.reset_state(w, fresh)
                elif self.zero_momentum and optimizer is not None:
                    optimizer.reset_momentum(w, fresh)
                reset += int(fresh.sum())
        self.model.set_masks(k, new_masks)
        return reset
