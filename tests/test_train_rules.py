"""DESIGN §1 rules checked on the real trainer (one process, tiny CNN on digits)."""

from __future__ import annotations

import pytest
import torch

from dist_ast.sparsity import SwitchableBatchNorm2d
from dist_ast.sparsity.updater import MaskUpdater
from tests.trainer_utils import RAMP60, cpu_trainer

SHORT = [*RAMP60, "optim.weight_decay=1e-3", "optim.nesterov=true"]


def make_trainer(tmp_path, *extra):
    return cpu_trainer(SHORT, tmp_path, *extra)


def run_steps(trainer, n, hook=None):
    batches = iter(trainer.loaders.train)
    for _ in range(n):
        x, y = next(batches)
        if hook:
            hook(trainer)
        trainer.train_step(x, y)
        trainer.step += 1


def snapshot(trainer):
    model = trainer.model
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    moms = {
        id(p): s["momentum_buffer"].clone()
        for p, s in trainer.optimizer.state.items()
        if "momentum_buffer" in s
    }
    return params, buffers, moms


def test_inactive_weights_and_other_bn_sets_stay_bit_identical(tmp_path):
    trainer = make_trainer(tmp_path)
    run_steps(trainer, 25)  # momentum built up, several mask updates done
    model = trainer.model
    checked = 0
    while checked < 6:
        if trainer.schedule.updates_at(trainer.step):
            run_steps(trainer, 1)
            continue
        k = trainer.schedule.active_subnet(trainer.step)
        masks = [m.clone() for m in model.masks(k)]
        params, buffers, moms = snapshot(trainer)
        run_steps(trainer, 1)
        for name, w, m in zip(model.sparse_names, model.sparse_weights(), masks, strict=True):
            before = params[f"net.{name}.weight"]
            assert torch.equal(w.detach()[~m], before[~m]), f"{name}: an inactive weight moved"
            assert not torch.equal(w.detach()[m], before[m]), f"{name}: active weights did not move"
            buf = trainer.optimizer.state[w]["momentum_buffer"]
            assert torch.equal(buf[~m], moms[id(w)][~m]), f"{name}: inactive momentum moved"
        others = [j for j in range(model.num_subnets) if j != k]
        for name, mod in model.named_modules():
            if isinstance(mod, SwitchableBatchNorm2d):
                for attr in ("weight", "bias"):
                    now = getattr(mod, attr).detach()
                    assert torch.equal(now[others], params[f"{name}.{attr}"][others])
                    assert not torch.equal(now[k], params[f"{name}.{attr}"][k])
                for attr in ("running_mean", "running_var", "num_batches_tracked"):
                    now = getattr(mod, attr)
                    assert torch.equal(now[others], buffers[f"{name}.{attr}"][others])
        checked += 1


def test_alternation_trains_subnet_t_mod_n(tmp_path):
    trainer = make_trainer(tmp_path)
    seen = []
    original = trainer.forward_backward

    def spy(subnets, x, y):
        seen.append((trainer.step, *subnets))
        return original(subnets, x, y)

    trainer.forward_backward = spy
    run_steps(trainer, 9)
    assert seen == [(t, t % 3) for t in range(9)]
    bn = next(m for m in trainer.model.modules() if isinstance(m, SwitchableBatchNorm2d))
    assert bn.num_batches_tracked.tolist() == [3, 3, 3]


def test_updates_follow_schedule_use_own_dense_gradient_and_exact_counts(tmp_path):
    trainer = make_trainer(tmp_path)
    weights = trainer.model.sparse_weights()
    grads_after_backward = {}
    original_fb = trainer.forward_backward

    def capture_fb(k, x, y):
        out = original_fb(k, x, y)
        grads_after_backward[trainer.step] = [w.grad.detach().clone() for w in weights]
        return out

    trainer.forward_backward = capture_fb
    calls, sparse_before = [], []
    original_decide = trainer.updater.decide

    def capture_decide(k, step, dense_grads):
        old = [m.clone() for m in trainer.model.masks(k)]
        new = original_decide(k, step, dense_grads)
        calls.append((k, step))
        # the gradient handed to regrowth is this very step's dense gradient
        for g, ref in zip(dense_grads, grads_after_backward[step], strict=True):
            assert torch.equal(g, ref)
        off = [(g[~m] != 0).any() for g, m in zip(dense_grads, old, strict=True) if not m.all()]
        sparse_before.append(bool(off))
        assert all(off)  # dense off the mask, where regrowth looks
        # DESIGN §1.6, written out: s(t) = s_k + (s_i - s_k)(1 - (t - t0)/(t1 - t0))^3,
        # s_i = 0, t0 = 0, t1 = 46 (one epoch of 1,500 digits at batch 32), s_k from t1 on
        s_k = (0.5, 0.8, 0.9)[k]
        s = s_k - s_k * (1 - min(step, 46) / 46) ** 3
        total = sum(w.numel() for w in weights)
        assert sum(int(m.sum()) for m in new) == round((1 - s) * total)
        return new

    trainer.updater.decide = capture_decide
    run_steps(trainer, 60)
    assert calls == sorted(calls, key=lambda c: c[1])  # one update per step, in step order
    # the gradient-off-the-mask check ran on every update but each sub-net's first (dense
    # initial masks) and sub-net 0's second (its step-0 update kept s_i = 0)
    assert sparse_before == [False] * 4 + [True] * 11
    # DESIGN §1.8 by hand: scheduled at k·Δτ + j·ΔT (Δτ = 4, ΔT = 12), carried out at the
    # first step t >= that with t mod 3 == k (here the scheduled step itself already is)
    assert [t for kk, t in calls if kk == 0] == [0, 12, 24, 36, 48]
    assert [t for kk, t in calls if kk == 1] == [4, 16, 28, 40, 52]
    assert [t for kk, t in calls if kk == 2] == [8, 20, 32, 44, 56]
    for k in range(3):  # after the ramp end every sub-net sits at its target exactly
        nonzero, total = trainer.model.mask_counts(k)
        assert nonzero == round((1 - (0.5, 0.8, 0.9)[k]) * total)


def test_grown_weights_start_at_zero_unless_live_in_another_subnet(tmp_path):
    trainer = make_trainer(tmp_path)
    run_steps(trainer, 3)
    model, opt = trainer.model, trainer.optimizer
    w = model.sparse_weights()[1]
    shape = w.shape
    old0 = torch.zeros(shape, dtype=torch.bool)
    old0.view(-1)[:10] = True
    other = torch.zeros(shape, dtype=torch.bool)
    other.view(-1)[20:30] = True
    masks0 = [m.clone() for m in model.masks(0)]
    masks0[1] = old0
    model.set_masks(0, masks0)
    for j in (1, 2):
        mj = [m.clone() for m in model.masks(j)]
        mj[1] = other
        model.set_masks(j, mj)
    with torch.no_grad():
        w.fill_(0.5)
    opt.state[w]["momentum_buffer"].fill_(1.0)
    new = [m.clone() for m in masks0]
    grown = torch.zeros(shape, dtype=torch.bool)
    grown.view(-1)[[5, 25, 40]] = True  # 5: kept, 25: live in sub-nets 1/2, 40: brand new
    new[1] = grown
    reset = trainer.updater.apply(0, new, opt)
    flat, buf = w.detach().view(-1), opt.state[w]["momentum_buffer"].view(-1)
    assert reset == 1
    assert flat[40] == 0 and buf[40] == 0  # new connection: zero weight, zero momentum
    assert flat[25] == 0.5 and buf[25] == 1.0  # shared value kept
    assert flat[5] == 0.5  # was already active in sub-net 0
    assert torch.equal(model.masks(0)[1], grown)


def test_joint_mode_trains_all_subnets_each_step(tmp_path):
    trainer = make_trainer(tmp_path, "ast=joint")
    model = trainer.model
    run_steps(trainer, 4)
    union = [m0 | m1 | m2 for m0, m1, m2 in zip(*(model.masks(k) for k in range(3)), strict=True)]
    before = [w.detach().clone() for w in model.sparse_weights()]
    run_steps(trainer, 1)
    for w, b, u in zip(model.sparse_weights(), before, union, strict=True):
        assert torch.equal(w.detach()[~u], b[~u])
    bn = next(m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d))
    assert bn.num_batches_tracked.tolist() == [5, 5, 5]
    assert trainer.gc.steps_checked == 0


def test_joint_gradient_is_sum_of_each_subnets_masked_gradient(tmp_path):
    trainer = make_trainer(
        tmp_path, "ast=joint", "optim.momentum=0", "optim.weight_decay=0", "optim.nesterov=false"
    )
    model = trainer.model
    run_steps(trainer, 2)
    x, y = next(iter(trainer.loaders.train))
    w = model.sparse_weights()[2]
    expected = torch.zeros_like(w)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in range(3):
        model.zero_grad(set_to_none=True)
        trainer.forward_backward([k], x, y)
        expected += w.grad * model.masks(k)[2]
    model.load_state_dict(state)  # undo the BN statistics those passes updated
    lr_step = trainer.step
    assert lr_step == 2 and not trainer.schedule.updates_at(lr_step)  # no mask change here
    before = w.detach().clone()
    trainer.train_step(x, y)
    from dist_ast.train import lr_at

    lr = lr_at(
        lr_step,
        peak=trainer.peak_lr,
        warmup_steps=trainer.warmup_steps,
        total_steps=trainer.schedule.total_steps,
    )
    assert torch.allclose(before - w.detach(), lr * expected, atol=1e-6)


def test_completely_subset_masks_are_nested(tmp_path):
    trainer = make_trainer(tmp_path, "ast.mask_relation=completely_subset")
    run_steps(trainer, 60)
    model = trainer.model
    for k in range(1, 3):
        for sparse, dense in zip(model.masks(k), model.masks(k - 1), strict=True):
            assert not (sparse & ~dense).any()
    for k in range(3):
        assert model.sparsity(k) == pytest.approx(trainer.config.ast.sparsities[k], abs=1e-4)
        for name, m in zip(model.sparse_names, model.masks(k), strict=True):
            assert m.any(), f"sub-net {k} lost every weight of {name}"


def test_non_disjoint_masks_differ_beyond_the_sparsity_gap(tmp_path):
    trainer = make_trainer(tmp_path)
    run_steps(trainer, 60)
    m0, m1 = trainer.model.masks(0), trainer.model.masks(1)
    outside = sum(int((b & ~a).sum()) for a, b in zip(m0, m1, strict=True))
    assert outside > 0  # sub-net 1 owns connections that sub-net 0 does not have


def test_gradient_correction_fires_in_a_real_run(tmp_path):
    trainer = make_trainer(tmp_path)
    run_steps(trainer, 45)
    assert trainer.gc.steps_checked == 30  # 2 of every 3 steps have a predecessor
    assert trainer.gc.conflicts > 0  # the released code's GC never fires; ours does


def test_conflicts_counted_without_gc_only_when_asked_and_without_effect(tmp_path):
    """Plain AST skips the conflict statistics unless ast.count_conflicts=true; counting
    never changes the trajectory (it only reads the gradient)."""
    runs = {}
    for count in (False, True):
        trainer = make_trainer(
            tmp_path / str(count), "ast=ast", f"ast.count_conflicts={str(count).lower()}"
        )
        run_steps(trainer, 45)
        runs[count] = trainer
    assert runs[False].gc.steps_checked == 0
    assert runs[True].gc.steps_checked == 30 and runs[True].gc.conflicts > 0
    for a, b in zip(runs[False].model.parameters(), runs[True].model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_individual_mode_is_one_subnet(tmp_path):
    trainer = make_trainer(tmp_path, "ast=individual", "ast.sparsities=[0.8]", "ast.stagger=0")
    run_steps(trainer, 30)
    assert trainer.model.num_subnets == 1 and trainer.gc.steps_checked == 0


def test_mask_updater_cs_sparser_subnets_only_prune(tmp_path):
    trainer = make_trainer(tmp_path, "ast.mask_relation=completely_subset")
    upd: MaskUpdater = trainer.updater
    model = trainer.model
    grads = [torch.randn_like(w) for w in model.sparse_weights()]
    new = upd.decide(1, 40, grads)
    for n, d in zip(new, model.masks(0), strict=True):
        assert not (n & ~d).any()
