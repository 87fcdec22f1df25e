"""Gradient correction on consecutive inner-group sub-nets (DESIGN §1.9, paper Eq. 5).

The math is pure functions over the gradient as a list of per-layer tensors (the same
arithmetic as one flat vector, without the copy); the small class around it holds
g_prev and the counters of paper Fig. 4.

Nothing here reads a value back to the host during a step (DESIGN §2, host syncs): the
sign test of g·ĝ is a ``torch.where`` on the device, so the correction is computed on
every checked step with a coefficient that is 0 when there is no conflict (g − 0·ĝ = g),
and the conflict counter accumulates on the device until someone reads it (a log step,
the summary, a checkpoint).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ast.sparsity.layers import memory_order
from dist_ast.state_codecs import StateMismatchError, int_tensor, int_value

# Elements per fp64 chunk on CPU: the two fp64 copies of a chunk (4 MB) stay in L3
# instead of materializing fp64 copies of every layer (~6 % of a ResNet-18 step), and
# the chunks are few enough that per-op overhead stays small. Measured on ResNet-50's
# 25.5M sparse weights (2-core EPYC, 32 MB L3): 2^15 77 ms, 2^16 44 ms, 2^18 33 ms,
# 2^20 88 ms (no longer cache-resident).
_CPU_CHUNK = 1 << 18


def _flat_views(*ts: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors flattened in their common storage order, as views (so writes land),
    or None when their layouts differ or are not dense (then flattening would copy)."""
    t0 = ts[0]
    if any(t.shape != t0.shape or t.stride() != t0.stride() for t in ts):
        return None
    if t0.is_contiguous():  # the common case: storage order = logical order, one view op
        return [t.view(-1) for t in ts]
    dense = t0.ndim == 4 and t0.is_contiguous(memory_format=torch.channels_last)
    if not dense:
        return None
    return [memory_order(t, t0) for t in ts]


def conflict_stats(
    grads: list[torch.Tensor],
    prev: list[torch.Tensor],
    masks: list[torch.Tensor],
    *,
    mask_prev: bool = False,
) -> torch.Tensor:
    """[g·ĝ, ‖ĝ‖²] with ĝ = prev ⊙ m, in float64 (products of fp32 values are exact there).

    One pass: each chunk is converted to fp64 once and both sums share it; ĝ is never
    materialized. Equal to per-layer fp64 ``torch.dot`` sums up to the order of the fp64
    additions (the accumulation is exact to ~1e-16 relative per addition either way).
    Chunks follow the storage order (channels_last weights are not copied to flatten).

    ``mask_prev``: also leave ĝ in ``prev`` (prev ← prev ⊙ m in place, exact), done
    chunk by chunk while the chunk is in cache, so that the correction that follows
    needs no pass over the masks of its own.
    """
    device = grads[0].device if grads else torch.device("cpu")
    dot = torch.zeros((), dtype=torch.float64, device=device)
    norm_sq = torch.zeros((), dtype=torch.float64, device=device)
    for g, p, m in zip(grads, prev, masks, strict=True):
        views = _flat_views(g, p, m)
        in_chunks = mask_prev and views is not None
        if views is None:  # layouts differ: flatten logically (copies)
            if mask_prev:
                p.mul_(m)  # ĝ into prev by a pass of its own
            views = [g.reshape(-1), p.reshape(-1), m.reshape(-1)]
        n = g.numel()
        step = _CPU_CHUNK if g.device.type == "cpu" else max(1, n)
        for i in range(0, n, step):
            # (a layer that is one chunk is used as is: three slice ops fewer)
            cg, cp, cm = views if n <= step else (v[i : i + step] for v in views)
            if in_chunks:  # fp32 p·m is exact, so its fp64 copy equals fp64 p·m
                h = cp.mul_(cm).double()
            else:
                h = cp.double().mul_(cm)
            dot += torch.dot(cg.double(), h)
            norm_sq += torch.dot(h, h)
    return torch.stack([dot, norm_sq])


def projection_coef(stats: torch.Tensor) -> torch.Tensor:
    """g·ĝ/‖ĝ‖² where g·ĝ < 0, else 0 (fp64, 0-dim, on the device of ``stats``).

    g − coef·ĝ is then the corrected gradient on every step, so no branch needs the sign
    on the host. (g·ĝ < 0 implies ‖ĝ‖² > 0; the second test only guards the division.)
    """
    dot, norm_sq = stats[0], stats[1]
    conflict = (dot < 0) & (norm_sq > 0)
    return torch.where(conflict, dot / torch.where(conflict, norm_sq, 1.0), 0.0)


def project_conflict(
    grads: list[torch.Tensor],
    prev: list[torch.Tensor],
    masks: list[torch.Tensor],
    *,
    reduce_group: object | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """g − (g·ĝ/‖ĝ‖²) ĝ if g·ĝ < 0 with ĝ = g_prev ⊙ m_k, else g (new tensors); and g·ĝ
    as a 0-dim fp64 device tensor. No host read.

    ``grads`` must already be supported on m_k, so the result is too. With
    ``reduce_group`` the two partial scalars are all-reduced first (ZeRO-2, where each
    rank holds a partition of the gradient).
    """
    stats = conflict_stats(grads, prev, masks)
    if reduce_group is not None:
        dist.all_reduce(stats, group=reduce_group)  # type: ignore[arg-type]
    coef = projection_coef(stats)
    out = [
        g - (coef.to(p.dtype) * (p * m)).to(g.dtype)
        for g, p, m in zip(grads, prev, masks, strict=True)
    ]
    return out, stats[0]


class GradientCorrection:
    """Inner-group GC state: the previous update direction and the conflict counters.

    ``steps_checked`` and ``conflicts`` are read from the device when accessed; between
    reads they accumulate there. On the fp16 path the caller passes ``finite``, the
    GradScaler's verdict as a device bool: a step it skips leaves g_prev and the
    counters as they were, decided on the device.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._prev: list[torch.Tensor] | None = None
        # whether _prev holds an applied direction: a device bool when that depends on
        # fp16 steps the scaler may have skipped, else a Python bool
        self._valid: bool | torch.Tensor = False
        self._read_counts = [0, 0]  # steps_checked, conflicts already on the host
        self._pending: torch.Tensor | None = None  # [checked, conflicts] since, int64
        self._dirty = False

    # -- the step ----------------------------------------------------------------------
    def __call__(
        self,
        grads: list[torch.Tensor],
        masks: list[torch.Tensor],
        group_start: bool,
        reduce_group: object | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | bool]:
        """Correct ``grads`` in place and return (them, whether g·ĝ < 0 as a device bool,
        or False on unchecked steps); g_prev ← the corrected g unless ``finite`` is False.
        """
        if group_start or self._prev is None or self._valid is False:
            self._keep_direction(grads, finite)
            return grads, False
        # fp32: g_prev is overwritten at the end of this step, so the statistics pass may
        # leave ĝ = g_prev ⊙ m in it; a skipped fp16 step must find g_prev intact
        stats = conflict_stats(grads, self._prev, masks, mask_prev=finite is None)
        if reduce_group is not None:
            dist.all_reduce(stats, group=reduce_group)  # type: ignore[arg-type]
        checked = self._valid if finite is None else finite & self._valid
        conflict = (stats[0] < 0) & checked
        self._count(checked, conflict)
        if self.enabled:
            self._correct(grads, masks, projection_coef(stats), finite)
        else:
            self._keep_direction(grads, finite)
        return grads, conflict

    @torch.no_grad()
    def _correct(
        self,
        grads: list[torch.Tensor],
        masks: list[torch.Tensor],
        coef: torch.Tensor,
        finite: torch.Tensor | None,
    ) -> None:
        """g ← g − coef·(g_prev ⊙ m), then g_prev ← g. The coefficient is rounded to the
        buffer's fp32 as a Python scalar would be; (c·p)·m equals c·(p·m) for a 0/1 mask.
        fp32: the statistics left ĝ in g_prev, which is overwritten below: scale it in
        place and subtract, two mask-free passes and no temporary."""
        prev = self._prev
        assert prev is not None
        c = coef.to(prev[0].dtype)
        if finite is None:
            torch._foreach_mul_(prev, c)
            torch._foreach_sub_(grads, prev)
        else:  # a skipped step must find g_prev intact
            torch._foreach_addcmul_(grads, torch._foreach_mul(prev, c), masks, value=-1.0)
        self._keep_direction(grads, finite)

    @torch.no_grad()
    def _keep_direction(self, grads: list[torch.Tensor], finite: torch.Tensor | None) -> None:
        """g_prev ← g (fp32), into last step's buffers when the shapes still match: a
        fresh 100 MB copy per ResNet-50 step costs 4x the copy itself in allocation. With
        ``finite``, only where it is True (a per-layer ``where``, fp16 path only)."""
        prev = self._prev
        reuse = prev is not None and [p.shape for p in prev] == [g.shape for g in grads]
        if finite is None:
            if reuse:
                torch._foreach_copy_(prev, [g.detach() for g in grads])
            else:
                self._prev = [g.detach().to(torch.float32, copy=True) for g in grads]
            self._valid = True
            return
        if reuse:
            for p, g in zip(prev, grads, strict=True):
                torch.where(finite, g.detach(), p, out=p)
            self._valid = True if self._valid is True else finite | self._valid
        else:
            self._prev = [torch.where(finite, g.detach(), 0.0).to(torch.float32) for g in grads]
            self._valid = finite

    def _count(self, checked: bool | torch.Tensor, conflict: torch.Tensor) -> None:
        if self._pending is None or self._pending.device != conflict.device:
            self._read()
            self._pending = torch.zeros(2, dtype=torch.int64, device=conflict.device)
        self._pending[0].add_(checked)
        self._pending[1].add_(conflict)
        self._dirty = True

    def _read(self) -> list[int]:
        """The counters on the host: one read of the device accumulator, if it moved."""
        if self._dirty and self._pending is not None:
            checked, conflicts = self._pending.tolist()
            self._pending.zero_()
            self._read_counts[0] += checked
            self._read_counts[1] += conflicts
            self._dirty = False
        return self._read_counts

    # -- what a checkpoint and the logs read -------------------------------------------
    @property
    def steps_checked(self) -> int:
        """Steps where a previous direction existed (not group starts, not skipped)."""
        return self._read()[0]

    @steps_checked.setter
    def steps_checked(self, value: int) -> None:
        self._read()[0] = int(value)

    @property
    def conflicts(self) -> int:
        """Of those, steps with g·ĝ < 0 (corrected when enabled): paper Fig. 4."""
        return self._read()[1]

    @conflicts.setter
    def conflicts(self, value: int) -> None:
        self._read()[1] = int(value)

    @property
    def prev(self) -> list[torch.Tensor] | None:
        """g_prev, or None before the first applied step (reads the fp16 validity flag)."""
        if isinstance(self._valid, torch.Tensor):
            self._valid = bool(self._valid)
        return self._prev if self._valid else None

    @prev.setter
    def prev(self, value: list[torch.Tensor] | None) -> None:
        self._prev = value
        self._valid = value is not None

    def state_dict(self) -> dict:
        """Tensors only (a checkpoint's form): the counters as int64 [hi, lo], g_prev as
        ``{"0": t0, "1": t1, …}`` (empty before the first applied step)."""
        return {
            "steps_checked": int_tensor(self.steps_checked),
            "conflicts": int_tensor(self.conflicts),
            "prev": {str(i): t for i, t in enumerate(self.prev or [])},
        }

    def load_state_dict(self, state: dict) -> None:
        prev = state["prev"]
        if sorted(prev, key=int) != [str(i) for i in range(len(prev))]:
            raise StateMismatchError("the saved GC buffer is incomplete")
        self.prev = [prev[str(i)] for i in range(len(prev))] or None
        self.steps_checked = int_value(state["steps_checked"])
        self.conflicts = int_value(state["conflicts"])
