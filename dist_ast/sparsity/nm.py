"""N:M structured sub-nets (DESIGN §1.10), as pure functions on tensors; the rules are in
docs/subnets.md ("N:M structured sub-nets") and docs/algorithm.md.

"N:M": at most N live weights in every group of M consecutive *input channels* (the
layout NVIDIA's sparse tensor cores accelerate; N is the number kept, so 2:4 is 50%
sparse). A conv weight [O, I, kh, kw] is grouped along I at every (o, kh, kw); a short
last group (I not a multiple of M) keeps min(N, its size). A group is N:M when it holds
at most N live weights, so the state is the masks alone. Ties go to the lower index.
"""

from __future__ import annotations

import math

import torch

from dist_ast.errors import require
from dist_ast.sparsity.masks import topk_mask


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse "2:4" into (2, 4)."""
    n, m = (int(x) for x in pattern.split(":"))
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M")
    return n, m


def pattern_sparsity(pattern: str) -> float:
    n, m = parse_pattern(pattern)
    return 1.0 - n / m


def to_groups(t: torch.Tensor, m: int, fill: float | bool = 0) -> torch.Tensor:
    """View ``t`` ([O, I] or [O, I, kh, kw]) as [G, m] groups of m consecutive input
    channels; a short last group is padded with ``fill``."""
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1)  # [O, kh, kw, I]: input channels last
    elif t.ndim != 2:
        raise ValueError(f"N:M groups need a 2-D or 4-D weight, got shape {tuple(t.shape)}")
    i = t.shape[-1]
    pad = (-i) % m
    if pad:
        t = torch.cat([t, t.new_full((*t.shape[:-1], pad), fill)], dim=-1)
    return t.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_groups` (drops the padding)."""
    shape = torch.Size(shape)
    i = shape[1]
    m = groups.shape[1]
    padded_i = i + (-i) % m
    if len(shape) == 4:
        o, _, kh, kw = shape
        t = groups.reshape(o, kh, kw, padded_i)[..., :i]
        return t.permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape[0], padded_i)[:, :i].contiguous()


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Live weights per group of m input channels."""
    return to_groups(mask, m, fill=False).sum(dim=1)


def satisfies(mask: torch.Tensor, pattern: str) -> bool:
    """True when every group of M input channels holds at most N live weights."""
    n, m = parse_pattern(pattern)
    return bool((group_counts(mask, m) <= n).all())


def nm_fraction(mask: torch.Tensor, pattern: str) -> float:
    """Fraction of the layer's prunable groups (more than N entries) that are N:M."""
    n, m = parse_pattern(pattern)
    valid = to_groups(torch.ones_like(mask), m, fill=False).sum(dim=1)
    prunable = valid > n
    if not bool(prunable.any()):
        return 1.0
    return float(((group_counts(mask, m) <= n) & prunable).sum()) / int(prunable.sum())


def _top_n_in_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [G, M]: the n largest scores of each row (stable: lower index wins ties)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(1, order, True)
    return out & (scores > -math.inf)


@torch.no_grad()
def nm_update(
    weight: torch.Tensor,
    mask: torch.Tensor,
    dense_grad: torch.Tensor | None,
    pattern: str,
    *,
    fraction: float,
    regrow_fraction: float,
) -> torch.Tensor:
    """One sub-net's new mask for one layer: steps 1-3 of docs/subnets.md."""
    n, m = parse_pattern(pattern)
    shape = weight.shape
    w = to_groups(weight.detach().abs().float(), m)
    valid = to_groups(torch.ones_like(mask), m, fill=False)
    live = to_groups(mask, m, fill=False)
    size = valid.sum(dim=1)
    prunable = size > n
    sparse = prunable & (live.sum(dim=1) <= n)
    group_w = w.sum(dim=1)
    n_prunable = int(prunable.sum())
    target = min(n_prunable, max(int(sparse.sum()), int(round(fraction * n_prunable))))

    # 1. Group-wise magnitude pruning up to the scheduled number of N:M groups.
    need = target - int(sparse.sum())
    if need > 0:
        dense = prunable & ~sparse
        sparse |= topk_mask((-group_w).masked_fill(~dense, -math.inf), need)

    # 2. Group-wise prune-and-regrow while dense groups remain.
    dense = prunable & ~sparse
    swaps = min(math.ceil(regrow_fraction * int(sparse.sum())), int(dense.sum()))
    if swaps > 0 and dense_grad is not None:
        g = to_groups(dense_grad.detach().abs().float(), m).sum(dim=1)
        grow = topk_mask(g.masked_fill(~sparse, -math.inf), swaps)
        drop = topk_mask((-group_w).masked_fill(~dense, -math.inf), swaps)
        sparse = (sparse & ~grow) | drop

    # 3. Inside every N:M group, the N weights of largest |w|.
    keep = _top_n_in_groups(w.masked_fill(~valid, -math.inf), n)
    new = torch.where(sparse[:, None], keep, valid)
    out = from_groups(new, shape)
    assert int(sparse.sum()) == target
    return out


def check_nm_patterns(
    patterns: list[str], sparsities: list[float], initial_sparsity: float, mask_relation: str
) -> None:
    """N:M sub-nets: one pattern 'N:M' per sub-net, each 1 - N/M sparse, starting dense
    and non-disjoint. Checked by RunConfig and by MaskUpdater."""
    require(
        len(patterns) == len(sparsities),
        "ast.nm_patterns",
        patterns,
        f"give one N:M pattern per sub-net ({len(sparsities)})",
    )
    expected = []
    for p in patterns:
        parts = p.split(":")
        ok = len(parts) == 2 and all(x.isdigit() for x in parts)
        ok = ok and 0 < int(parts[0]) < int(parts[1])
        require(ok, "ast.nm_patterns", patterns, "patterns look like '2:4' with 0 < N < M")
        expected.append(round(1.0 - int(parts[0]) / int(parts[1]), 6))
    require(
        mask_relation == "non_disjoint",
        "ast.mask_relation",
        mask_relation,
        "N:M sub-nets (ast.nm_patterns) are trained non-disjoint; set "
        "ast.mask_relation=non_disjoint",
    )
    require(
        initial_sparsity == 0.0,
        "ast.initial_sparsity",
        initial_sparsity,
        "N:M sub-nets (ast.nm_patterns) start dense (0% N:M groups); set ast.initial_sparsity=0",
    )
    require(
        all(abs(a - b) <= 1e-6 for a, b in zip(expected, sparsities, strict=True)),
        "ast.sparsities",
        list(sparsities),
        f"an N:M sub-net of ast.nm_patterns={patterns} is 1 - N/M sparse; set "
        f"ast.sparsities={expected}",
    )
