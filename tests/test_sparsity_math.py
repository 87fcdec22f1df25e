"""DESIGN §1 rules on the pure functions: masks, schedule, prune-and-regrow, GC, SGD."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ast.sparsity import (
    GradientCorrection,
    MaskedSGD,
    SparsitySchedule,
    cubic_sparsity,
    drop_and_regrow,
    global_magnitude_prune,
    project_conflict,
    prune_and_regrow,
    regrow_fraction,
)
from dist_ast.sparsity import gradient_correction as gc_module
from dist_ast.sparsity import masks as masks_module
from dist_ast.sparsity.masks import (
    density_count,
    kth_largest,
    random_mask,
    random_masks,
    topk_mask,
)
from dist_ast.sparsity.optim import masked_sgd_

# -- exact top-k -----------------------------------------------------------------------


@given(
    n=st.integers(1, 400),
    frac=st.floats(0, 1),
    seed=st.integers(0, 10_000),
    levels=st.integers(1, 5),
)
@settings(max_examples=150, deadline=None)
def test_topk_mask_exact_count_and_deterministic_ties(n, frac, seed, levels):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float()  # many ties
    k = int(frac * n)
    m = topk_mask(scores, k)
    assert int(m.sum()) == k
    if 0 < k < n:
        # every chosen score >= every unchosen score
        assert scores[m].min() >= scores[~m].max()
        # ties broken by lower index first
        t = scores[m].min()
        tied = (scores == t).nonzero().flatten()
        chosen_tied = (m & (scores == t)).nonzero().flatten()
        assert torch.equal(chosen_tied, tied[: len(chosen_tied)])
    assert torch.equal(m, topk_mask(scores.clone(), k))


def _sampled_selection(sample_size: int):
    """Force the sampled (Floyd–Rivest) path of kth_largest on small inputs."""
    return mock.patch.multiple(masks_module, SAMPLED_SELECT_MIN=1, SAMPLE_SIZE=sample_size)


@given(
    n=st.integers(1, 3000),
    kfrac=st.floats(0, 1),
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([2, 5, 1000, 0]),  # 0: continuous values
    neg_inf=st.floats(0, 1),  # share of masked-out (-inf) scores
    pos_inf=st.sampled_from([0.0, 0.05]),
    sample_size=st.sampled_from([1, 8, 64, 1024]),
    ordered=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_kth_largest_sampled_is_exact(
    n, kfrac, seed, levels, neg_inf, pos_inf, sample_size, ordered
):
    """The sampled selection returns exactly the k-th largest value whatever the
    sample (ties, ±inf, sorted inputs that bias a strided sample)."""
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, generator=g)
        if levels == 0
        else torch.randint(0, levels, (n,), generator=g).float()
    )
    u = torch.rand(n, generator=g)
    x = x.masked_fill(u < neg_inf, -math.inf).masked_fill(u > 1 - pos_inf, math.inf)
    if ordered:
        x = x.sort().values
    k = 1 + int(kfrac * (n - 1))
    expect = x.sort(descending=True).values[k - 1]
    with _sampled_selection(sample_size):
        got = kth_largest(x, k)
        mask = topk_mask(x, k)
    assert got == expect, (got, expect)
    assert int(mask.sum()) == k
    reference = torch.zeros(n, dtype=torch.bool)  # stable sort: ties to the lower index
    reference[torch.sort(x, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(mask, reference)


def test_kth_largest_sampled_path_on_a_large_input():
    """At the default sizes (the path every ResNet-50 update takes) on 2M scores."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g).abs()
    x[torch.rand(x.shape, generator=g) < 0.7] = -math.inf
    assert x.numel() >= masks_module.SAMPLED_SELECT_MIN
    for k in (1, 1234, 400_000, 599_000, 600_500, 1_999_999):
        assert kth_largest(x, k) == torch.kthvalue(x, x.numel() - k + 1).values, k


def test_random_mask_has_exact_count():
    g = torch.Generator().manual_seed(0)
    m = random_mask((7, 11, 3), 100, g)
    assert m.shape == (7, 11, 3) and int(m.sum()) == 100


def test_random_masks_exact_count_overall_or_per_layer():
    like = [torch.empty(7, 11, 3), torch.empty(50), torch.empty(4, 4)]
    whole = random_masks(like, 0.3, torch.Generator().manual_seed(0))
    assert [m.shape for m in whole] == [t.shape for t in like]
    assert sum(int(m.sum()) for m in whole) == density_count(0.3, 7 * 11 * 3 + 50 + 16)
    each = random_masks(like, 0.3, torch.Generator().manual_seed(0), per_layer=True)
    assert [int(m.sum()) for m in each] == [density_count(0.3, t.numel()) for t in like]
    again = random_masks(like, 0.3, torch.Generator().manual_seed(0), per_layer=True)
    assert all(torch.equal(a, b) for a, b in zip(each, again, strict=True))


# -- schedules -------------------------------------------------------------------------


@given(
    final=st.floats(0.01, 0.99),
    initial=st.sampled_from([0.0, 0.5, 0.8, 0.9]),
    t0=st.integers(0, 100),
    span=st.integers(1, 1000),
)
def test_cubic_schedule_endpoints_and_monotone(final, initial, t0, span):
    initial = min(initial, final)
    t1 = t0 + span
    s = lambda t: cubic_sparsity(t, final=final, initial=initial, ramp_start=t0, ramp_end=t1)  # noqa: E731
    assert s(t0) == initial
    assert s(t1) == final  # exactly, not approximately
    assert s(t1 + 10) == final
    values = [s(t) for t in range(t0, t1 + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False))
    mid = t0 + span / 2
    assert s(mid) == pytest.approx(final + (initial - final) * 0.125)


def test_regrow_fraction_cosine():
    r = lambda t: regrow_fraction(t, total_steps=100, initial=0.5, minimum=0.005)  # noqa: E731
    assert r(0) == pytest.approx(0.5)
    assert r(100) == pytest.approx(0.005)
    assert r(50) == pytest.approx(0.005 + 0.495 / 2)


def _schedule(n=3, every=20, stagger=5, total=200, alternating=True):
    return SparsitySchedule(
        sparsities=tuple([0.5, 0.8, 0.9][:n]),
        initial_sparsity=0.0,
        total_steps=total,
        ramp_start=10,
        ramp_end=150,
        update_every=every,
        stagger=stagger,
        update_end=total,
        alternating=alternating,
    )


def test_alternation_is_step_mod_n():
    s = _schedule()
    assert [s.active_subnet(t) for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [s.is_group_start(t) for t in range(6)] == [True, False, False, True, False, False]


@pytest.mark.parametrize("every,stagger", [(20, 5), (30, 10), (7, 3), (12, 4)])
def test_stagger_shifts_by_k_dtau_then_moves_to_own_step(every, stagger):
    s = _schedule(every=every, stagger=stagger)
    base = s.scheduled_updates(0)
    for k in range(3):
        scheduled = s.scheduled_updates(k)
        assert scheduled == [b + k * stagger for b in base if b + k * stagger < s.update_end]
        carried = [s.update_step(k, t) for t in scheduled]
        for t, c in zip(scheduled, carried, strict=True):
            assert c >= t and c - t < 3 and c % 3 == k  # first own step at/after scheduled
    # updates_at agrees with the list view, and at most one sub-net updates per step
    seen = {k: [] for k in range(3)}
    for step in range(s.total_steps):
        ks = s.updates_at(step)
        assert len(ks) <= 1
        for k in ks:
            assert s.active_subnet(step) == k
            seen[k].append(step)
    for k in range(3):
        expect = [s.update_step(k, t) for t in s.scheduled_updates(k)]
        assert seen[k] == [t for t in expect if t < s.total_steps]


def test_joint_schedule_updates_at_scheduled_step():
    s = _schedule(alternating=False)
    for k in range(3):
        got = [t for t in range(s.total_steps) if k in s.updates_at(t)]
        assert got == s.scheduled_updates(k)


def test_stagger_must_leave_room():
    with pytest.raises(ValueError):
        _schedule(every=10, stagger=5)


# -- prune-and-regrow ------------------------------------------------------------------


def _layers(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@given(
    seed=st.integers(0, 1000),
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    d_active=st.floats(0.05, 1.0),
    d_target=st.floats(0.0, 1.0),
    frac=st.floats(0.0, 1.0),
)
@settings(max_examples=120, deadline=None)
def test_prune_and_regrow_exact_counts(seed, sizes, d_active, d_target, frac):
    shapes = [(s, 3) for s in sizes]
    w = _layers(seed, shapes)
    grads = _layers(seed + 1, shapes)
    total = sum(x.numel() for x in w)
    g = torch.Generator().manual_seed(seed)
    flat = random_mask((total,), density_count(d_active, total), g)
    masks = [
        m.view(s) for m, s in zip(torch.split(flat, [x.numel() for x in w]), shapes, strict=True)
    ]
    active = int(flat.sum())
    target = min(density_count(d_target, total), active)
    new = prune_and_regrow(w, masks, grads, target_count=target, regrow_fraction=frac)
    assert sum(int(m.sum()) for m in new) == target


def test_global_magnitude_prune_keeps_largest_across_layers():
    w = [torch.tensor([0.1, -5.0, 0.3]), torch.tensor([[4.0, -0.2], [0.05, 3.0]])]
    masks = [torch.ones(3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)]
    new = global_magnitude_prune(w, masks, 3)
    assert new[0].tolist() == [False, True, False]
    assert new[1].tolist() == [[True, False], [False, True]]
    # inactive weights are never kept, even when large
    masks2 = [torch.tensor([True, False, True]), torch.ones(2, 2, dtype=torch.bool)]
    new2 = global_magnitude_prune(w, masks2, 2)
    assert not new2[0][1] and int(sum(m.sum() for m in new2)) == 2


def test_drop_and_regrow_picks_largest_dense_grad_among_inactive():
    w = torch.tensor([0.9, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([True, True, True, False, False, False, False, False])
    grad = torch.tensor([9.0, 0.2, 0.3, 0.5, -7.0, 0.1, 3.0, 0.0])
    new, n = drop_and_regrow(w, mask, grad, fraction=0.5)  # ceil(0.5 * 3) = 2 dropped
    assert n == 2
    # keeps the largest |w| (0.9; its big gradient cannot make it count twice), regrows
    # the two largest |g| among the rest: idx 4 and 6, never active before
    assert new.nonzero().flatten().tolist() == [0, 4, 6]
    # a just-dropped position competes for regrowth like any inactive one
    grad[1] = 8.0
    again, _ = drop_and_regrow(w, mask, grad, fraction=0.5)
    assert again.nonzero().flatten().tolist() == [0, 1, 4]


def test_regrowth_uses_dense_gradient_not_masked_one():
    """With ∂L/∂w (zero off the mask) regrowth could only re-pick dropped weights: the
    released code's identity bug. Our regrowth sees the dense gradient."""
    w = torch.tensor([1.0, 0.5, 0.0, 0.0])
    mask = torch.tensor([True, True, False, False])
    dense = torch.tensor([0.1, 0.1, 2.0, 3.0])
    new, _ = drop_and_regrow(w, mask, dense, fraction=0.5)
    assert new.tolist() == [True, False, False, True]
    masked = dense * mask
    same, _ = drop_and_regrow(w, mask, masked, fraction=0.5)
    assert same.tolist() != new.tolist()


def test_protected_weights_rank_first_but_by_magnitude_when_too_many():
    """CS with stagger: the sparser sub-net can hold more weights than the new count;
    the kept ones are then its largest, not the lowest indices (a whole layer)."""
    w = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 4.0, 0.05])]
    masks = [torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    protect = [torch.tensor([True, True, False]), torch.tensor([True, True, False])]
    new = global_magnitude_prune(w, masks, 3, protect)
    assert new[0].tolist() == [False, True, False] and new[1].tolist() == [True, True, False]
    few = global_magnitude_prune(w, masks, 5, protect)
    assert few[0].tolist() == [True, True, True] and few[1].tolist() == [True, True, False]


def test_protected_positions_are_never_dropped():
    w = torch.tensor([0.01, 0.5, 0.6, 0.0])
    mask = torch.tensor([True, True, True, False])
    protect = torch.tensor([True, False, False, False])
    new, _ = drop_and_regrow(w, mask, torch.tensor([0.0, 0, 0, 1.0]), 0.4, protect=protect)
    assert new[0] and int(new.sum()) == 3


# -- gradient correction ---------------------------------------------------------------


def test_gc_projects_conflicting_gradient_to_orthogonal():
    mask = [torch.tensor([True, True, True, False])]
    prev = [torch.tensor([1.0, 0.0, 2.0, 5.0])]
    g = [torch.tensor([-1.0, 1.0, -1.0, 0.0])]
    out, dot = project_conflict(g, prev, mask)
    g_hat = prev[0] * mask[0]
    assert float(dot) == pytest.approx(-3.0)
    assert torch.dot(out[0], g_hat).item() == pytest.approx(0.0, abs=1e-6)
    assert out[0][3] == 0  # stays supported on m_k
    expected = g[0] - (-3.0 / 5.0) * g_hat
    assert torch.allclose(out[0], expected)


def test_gc_leaves_aligned_gradient_unchanged():
    mask = [torch.ones(3, dtype=torch.bool)]
    prev = [torch.tensor([1.0, 1.0, 0.0])]
    g = [torch.tensor([1.0, -0.5, 3.0])]
    out, dot = project_conflict(g, prev, mask)
    assert float(dot) >= 0 and torch.equal(out[0], g[0])  # g − 0·ĝ: branch-free, same values


@given(seed=st.integers(0, 5000), n=st.integers(2, 50))
@settings(max_examples=80, deadline=None)
def test_gc_orthogonal_after_correction_property(seed, n):
    gen = torch.Generator().manual_seed(seed)
    mask = [torch.rand(n, generator=gen) < 0.6]
    prev = [torch.randn(n, generator=gen, dtype=torch.float64)]
    g = [torch.randn(n, generator=gen, dtype=torch.float64) * mask[0]]
    out, dot = project_conflict(g, prev, mask)
    dot = float(dot)
    g_hat = prev[0] * mask[0]
    after = torch.dot(out[0], g_hat).item()
    if dot < 0:
        assert abs(after) <= 1e-9 * (1 + g_hat.norm().item() * g[0].norm().item())
    else:
        assert torch.equal(out[0], g[0])
    assert not out[0][~mask[0]].any()


@given(
    seed=st.integers(0, 5000),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    chunk=st.integers(1, 16),
)
@settings(max_examples=60, deadline=None)
def test_gc_statistics_over_chunks_equal_one_flat_fp64_dot(seed, sizes, chunk):
    """The chunked one-pass statistics are [g·ĝ, ‖ĝ‖²] of the flat vectors, in fp64."""
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(n, generator=gen) < 0.5 for n in sizes]
    prev = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * m for n, m in zip(sizes, masks, strict=True)]
    g_hat = torch.cat([p.double() * m for p, m in zip(prev, masks, strict=True)])
    flat_g = torch.cat(grads).double()
    with mock.patch.object(gc_module, "_CPU_CHUNK", chunk):
        dot, norm_sq = gc_module.conflict_stats(grads, prev, masks).tolist()
    assert dot == pytest.approx(torch.dot(flat_g, g_hat).item(), rel=1e-12, abs=1e-12)
    assert norm_sq == pytest.approx(torch.dot(g_hat, g_hat).item(), rel=1e-12, abs=1e-12)


def test_gc_inner_group_semantics_and_counts():
    gc = GradientCorrection(enabled=True)
    m = [torch.ones(2, dtype=torch.bool)]
    # group start: no correction even if it conflicts with whatever came before
    g0, c0 = gc([torch.tensor([1.0, 0.0])], m, group_start=True)
    assert not c0 and torch.equal(g0[0], torch.tensor([1.0, 0.0]))
    g1, c1 = gc([torch.tensor([-1.0, 1.0])], m, group_start=False)
    assert c1 and torch.allclose(g1[0], torch.tensor([0.0, 1.0]))
    # g_prev is the applied (corrected) direction, not the raw gradient
    assert torch.allclose(gc.prev[0], torch.tensor([0.0, 1.0]))
    g2, c2 = gc([torch.tensor([-1.0, 0.5])], m, group_start=True)
    assert not c2 and torch.equal(g2[0], torch.tensor([-1.0, 0.5]))
    assert (gc.steps_checked, gc.conflicts) == (1, 1)
    off = GradientCorrection(enabled=False)
    off([torch.tensor([1.0, 0.0])], m, True)
    g, c = off([torch.tensor([-1.0, 1.0])], m, False)
    assert c and torch.equal(g[0], torch.tensor([-1.0, 1.0]))  # counted, not corrected


def test_gc_in_place_equals_pure_projection_and_fp16_skips_leave_state():
    """The class corrects in place with the buffer as scratch; the values equal the pure
    function's. With ``finite`` False (a step GradScaler skips) g_prev, its validity and
    the counters stay as they were, decided on the device."""
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(7, 3, generator=gen) < 0.5, torch.rand(11, generator=gen) < 0.5]

    def grads(sign: float = 1.0) -> list[torch.Tensor]:
        return [sign * torch.randn(m.shape, generator=gen) * m for m in masks]

    gc = GradientCorrection(enabled=True)
    first = grads()
    gc([g.clone() for g in first], masks, group_start=True)
    g = grads(-1.0)
    want, dot = project_conflict(g, [t.clone() for t in first], masks)
    got, conflicted = gc([t.clone() for t in g], masks, group_start=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert bool(conflicted) == (float(dot) < 0)
    assert all(torch.equal(p, w) for p, w in zip(gc.prev, want, strict=True))
    counts = (gc.steps_checked, gc.conflicts)

    no = torch.tensor(False)
    gc([torch.full(m.shape, math.inf) for m in masks], masks, False, finite=no)
    gc([torch.full(m.shape, math.nan) for m in masks], masks, True, finite=no)
    assert all(torch.equal(p, w) for p, w in zip(gc.prev, want, strict=True))
    assert (gc.steps_checked, gc.conflicts) == counts
    g = grads()
    gc([t.clone() for t in g], masks, False, finite=torch.tensor(True))
    assert gc.steps_checked == counts[0] + 1

    # channels_last layers: the statistics chunk them in storage order and leave ĝ in
    # g_prev through views; the result is the logical-order computation's
    cl = [torch.rand(5, 4, 3, 3, generator=gen) < 0.5, torch.rand(6, 5, 1, 1, generator=gen) < 0.5]
    first = [torch.randn(m.shape, generator=gen) * m for m in cl]
    g = [
        (0.5 * torch.randn(m.shape, generator=gen) - f) * m for f, m in zip(first, cl, strict=True)
    ]
    want, dot = project_conflict(g, first, cl)

    def nhwc(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.contiguous(memory_format=torch.channels_last) for t in ts]

    gc = GradientCorrection()
    gc(nhwc(first), nhwc(cl), group_start=True)
    got, conflicted = gc(nhwc(g), nhwc(cl), group_start=False)
    assert bool(conflicted) and float(dot) < 0
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(torch.equal(p, w) for p, w in zip(gc.prev, want, strict=True))

    # a run whose first step is skipped has no direction yet: nothing to compare with next
    fresh = GradientCorrection()
    fresh([torch.full(m.shape, math.inf) for m in masks], masks, True, finite=no)
    fresh(grads(), masks, False, finite=torch.tensor(True))
    assert fresh.steps_checked == 0 and fresh.prev is not None


# -- masked SGD ------------------------------------------------------------------------


def test_masked_sgd_moves_only_inside_mask_no_decay_no_momentum_outside():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    mask = torch.rand(50) < 0.3
    opt = MaskedSGD([{"params": [p], "weight_decay": 0.1}], lr=0.1, momentum=0.9, nesterov=True)
    for i in range(5):
        before = p.detach().clone()
        buf_before = opt.state[p].get("momentum_buffer")
        buf_before = None if buf_before is None else buf_before.clone()
        p.grad = torch.randn(50)  # dense gradient, nonzero everywhere
        m = mask if i % 2 == 0 else ~mask
        opt.step({p: m})
        assert torch.equal(p.detach()[~m], before[~m])
        assert (p.detach()[m] != before[m]).all()
        if buf_before is not None:
            assert torch.equal(opt.state[p]["momentum_buffer"][~m], buf_before[~m])


def test_masked_sgd_matches_torch_sgd_inside_mask():
    torch.manual_seed(1)
    for nesterov in (False, True):
        a = torch.nn.Parameter(torch.randn(20))
        b = torch.nn.Parameter(a.detach().clone())
        ref = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
        ours = MaskedSGD([a], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
        full = torch.ones(20, dtype=torch.bool)
        for _ in range(4):
            g = torch.randn(20)
            a.grad, b.grad = g.clone(), g.clone()
            ours.step({a: full})
            ref.step()
        assert torch.allclose(a, b, atol=1e-6)


def test_masked_sgd_function_without_momentum():
    p = torch.zeros(4)
    buf = masked_sgd_(
        p,
        torch.ones(4),
        None,
        torch.tensor([True, False, True, False]),
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        nesterov=False,
    )
    assert buf is None and p.tolist() == [-1.0, 0.0, -1.0, 0.0]


def test_density_count_rounding():
    assert density_count(0.1, 1000) == 100
    assert density_count(1 - 0.95, 25_557_032) == round(0.05 * 25_557_032)
    assert math.isclose(1 - density_count(0.1, 12345) / 12345, 0.9, abs_tol=1e-4)
