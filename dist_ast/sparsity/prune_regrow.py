"""Prune-and-regrow (DESIGN §1.7), as pure functions on lists of per-layer tensors.

Inputs are the shared weights, the sub-net's current masks and the all-reduced dense
gradient; the output is the new masks. Counts are exact and asserted.
"""

from __future__ import annotations

import math

import torch

from dist_ast.sparsity.masks import split_flat, topk_mask


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))  # 2x faster than sum() on bool


def global_magnitude_prune(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor],
    keep: int,
    protect: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Keep the ``keep`` active weights of largest |w| across all layers.

    ``protect`` (optional bool masks) are kept first, whatever their magnitude: the
    completely-subset mode uses it to keep the next sparser sub-net inside this one.
    Never grows: if ``keep`` exceeds the active count, the masks are returned unchanged.
    """
    active = sum(_count(m) for m in masks)
    if keep >= active:
        return [m.clone() for m in masks]
    # Protected weights rank above all others but keep their magnitude order among
    # themselves: with stagger, the next sparser sub-net may still hold more weights than
    # ``keep``, and a flat +inf would then cut by index order (whole last layers).
    shift = 1.0 + max(float(w.detach().abs().max()) for w in weights) if protect else 0.0
    scores = []
    for i, (w, m) in enumerate(zip(weights, masks, strict=True)):
        s = w.detach().abs().float()
        if protect is not None:
            s = torch.where(protect[i] & m, s + shift, s)
        scores.append(s.masked_fill(~m, -math.inf).reshape(-1))
    flat = topk_mask(torch.cat(scores), keep)
    new = [m & f for m, f in zip(masks, split_flat(flat, masks), strict=True)]
    assert sum(_count(m) for m in new) == keep
    return new


def drop_and_regrow(
    weight: torch.Tensor,
    mask: torch.Tensor,
    dense_grad: torch.Tensor,
    fraction: float,
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Per layer: drop ⌈fraction·nnz⌉ smallest-|w| active weights, regrow as many inactive
    positions of largest |dense gradient|. Returns (new mask, number regrown).

    Regrowth scores every position still active after the drop as -inf, so it never
    re-picks a live weight (the count drift of sparse_learning issue 22); positions just
    dropped may be regrown. ``protect`` positions are never dropped.
    """
    nnz = _count(mask)
    n_drop = min(math.ceil(fraction * nnz), nnz)
    if protect is not None:
        n_drop = min(n_drop, nnz - _count(protect & mask))
    if n_drop <= 0:
        return mask.clone(), 0
    keep_scores = weight.detach().abs().float().masked_fill(~mask, -math.inf)
    if protect is not None:
        keep_scores = keep_scores.masked_fill(protect & mask, math.inf)
    kept = topk_mask(keep_scores, nnz - n_drop)
    grow_scores = dense_grad.detach().abs().float().masked_fill(kept, -math.inf)
    grown = topk_mask(grow_scores, n_drop)
    new = kept | grown
    assert _count(new) == nnz and not bool((kept & grown).any())
    return new, n_drop


def prune_and_regrow(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor],
    dense_grads: list[torch.Tensor] | None,
    *,
    target_count: int,
    regrow_fraction: float,
    protect: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One update of one sub-net: global magnitude pruning to ``target_count``, then
    per-layer drop-and-regrow (skipped when ``dense_grads`` is None: the
    completely-subset mode's sparser sub-nets only prune)."""
    pruned = global_magnitude_prune(weights, masks, target_count, protect)
    if dense_grads is None or regrow_fraction <= 0:
        new = pruned
    else:
        new = [
            drop_and_regrow(w, m, g, regrow_fraction, None if protect is None else p)[0]
            for w, m, g, p in zip(
                weights, pruned, dense_grads, protect or [None] * len(weights), strict=True
            )
        ]
    total = sum(_count(m) for m in new)
    expected = min(target_count, sum(_count(m) for m in masks))
    assert total == expected, f"mask count {total} != scheduled {expected}"
    return new
