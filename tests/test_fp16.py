"""fp16 autocast with GradScaler on the real trainer (CPU): GC works on the unscaled
gradient, and a step the scaler skips (inf/nan gradients) changes nothing it should not.

CPU autocast runs convolutions and linears in fp16 in torch 2.14, and
``GradScaler("cpu")`` scales the loss by 2^16, so a GC fed the scaled gradient would
store a g_prev 65536 times too large. Overflow is forced by writing an inf into one
gradient after backward: in a sparse weight, and in a dense layer (the first conv),
which the scaler also checks — GC must follow the scaler's verdict, not its own.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_ast.sparsity.prune_regrow import global_magnitude_prune
from tests.trainer_utils import RAMP60, cpu_trainer

FP16 = [*RAMP60, "train.precision=fp16"]


def make_trainer(tmp_path, *extra):
    trainer = cpu_trainer(FP16, tmp_path, *extra)
    assert trainer.scaler is not None
    return trainer


class Capture:
    """Wraps forward_backward: keeps the scaled dense gradients it leaves behind, and
    optionally writes an inf into one parameter's gradient (an fp16 overflow)."""

    def __init__(self, trainer):
        self.trainer, self.original = trainer, trainer.forward_backward
        self.grads: list[torch.Tensor] = []
        self.poison: torch.Tensor | None = None
        trainer.forward_backward = self

    def __call__(self, k, x, y):
        loss = self.original(k, x, y)
        weights = self.trainer.model.sparse_weights()
        self.grads = [w.grad.detach().clone() for w in weights]
        if self.poison is not None:
            self.poison.grad.view(-1)[0] = math.inf
            self.poison = None
        return loss


def run_to(trainer, batches, pred):
    """Train until ``pred(trainer)`` holds for the next step."""
    while not pred(trainer):
        trainer.train_step(*next(batches))
        trainer.step += 1


def ordinary(t) -> bool:
    s = t.step
    return s > 6 and not t.schedule.is_group_start(s) and not t.schedule.updates_at(s)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def test_autocast_runs_fp16_on_cpu(tmp_path):
    """The premise of this file: the forward really is fp16 and the loss really scaled."""
    trainer = make_trainer(tmp_path)
    x, _ = next(iter(trainer.loaders.train))
    with trainer.autocast():
        assert trainer.model(x).dtype == torch.float16
    assert trainer.scaler.get_scale() == 2.0**16


def test_gc_sees_unscaled_gradients(tmp_path):
    """No momentum or decay: each step moves w by −lr·(applied direction). Compare with
    the GC projection computed here from the captured scaled gradient divided by the
    scale, and check g_prev is that unscaled direction."""
    trainer = make_trainer(
        tmp_path, "optim.momentum=0", "optim.weight_decay=0", "optim.nesterov=false"
    )
    cap = Capture(trainer)
    model, weights = trainer.model, trainer.model.sparse_weights()
    batches = iter(trainer.loaders.train)
    prev, projected, compared = None, 0, 0
    for _ in range(20):
        step = trainer.step
        k = trainer.schedule.active_subnet(step)
        masks = [m.clone() for m in model.masks(k)]
        before = [w.detach().clone() for w in weights]
        scale = trainer.scaler.get_scale()
        out = trainer.train_step(*next(batches))
        trainer.step += 1
        assert trainer.scaler.get_scale() >= scale, "an unexpected overflow: pick other data"
        g = flat([gr / scale * m for gr, m in zip(cap.grads, masks, strict=True)])
        if prev is not None and not trainer.schedule.is_group_start(step):
            g_hat = flat([p * m for p, m in zip(prev, masks, strict=True)])
            dot = float(g @ g_hat)
            if dot < 0:
                g = g - dot / float(g_hat @ g_hat) * g_hat
                projected += 1
        sizes = [w.numel() for w in weights]
        prev = [t.view_as(w).float() for t, w in zip(g.split(sizes), weights, strict=True)]
        stored = flat(trainer.gc.prev)
        tol = 1e-4 * float(g.abs().max())
        assert torch.allclose(stored, g, rtol=1e-3, atol=tol), f"g_prev at step {step}"
        if trainer.schedule.updates_at(step):  # regrown weights are reset after the update
            continue
        moved = flat([b - w.detach() for b, w in zip(before, weights, strict=True)])
        assert torch.allclose(moved / out["lr"], g, rtol=1e-3, atol=tol), step
        compared += 1
    assert projected > 0 and compared > 10


def _state(trainer):
    model, opt = trainer.model, trainer.optimizer
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "masks": {n: b.clone() for n, b in model.named_buffers() if n.endswith("masks")},
        "momentum": {
            n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()
        },
        "g_prev": [t.clone() for t in trainer.gc.prev],
        "counters": (trainer.gc.steps_checked, trainer.gc.conflicts),
    }


def _assert_same(a, b):
    for part in ("params", "masks", "momentum"):
        diff = [n for n in a[part] if not torch.equal(a[part][n], b[part][n])]
        assert not diff, f"{part} changed on a skipped step: {diff[:4]}"
    assert all(torch.equal(x, y) for x, y in zip(a["g_prev"], b["g_prev"], strict=True))
    assert a["counters"] == b["counters"]


@pytest.mark.parametrize("where", ["sparse", "dense"])
def test_inf_step_is_skipped_and_changes_nothing(tmp_path, where):
    trainer = make_trainer(tmp_path)
    cap = Capture(trainer)
    batches = iter(trainer.loaders.train)
    run_to(trainer, batches, ordinary)
    model = trainer.model
    sparse = {id(w) for w in model.sparse_weights()}
    dense_conv = next(p for p in model.parameters() if p.ndim == 4 and id(p) not in sparse)
    cap.poison = model.sparse_weights()[1] if where == "sparse" else dense_conv
    before = _state(trainer)
    scale = trainer.scaler.get_scale()
    out = trainer.train_step(*next(batches))
    trainer.step += 1
    assert trainer.scaler.get_scale() == scale / 2  # the scaler saw the inf and skipped
    _assert_same(before, _state(trainer))
    assert not bool(out["gc_conflict"])
    # the next step compares with the g_prev from before the skip, and trains
    run_to(trainer, batches, ordinary)
    checked = trainer.gc.steps_checked
    trainer.train_step(*next(batches))
    assert trainer.gc.steps_checked == checked + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_inf_on_a_mask_update_step_only_prunes(tmp_path):
    """Regrowth ranks positions by the dense gradient: an overflowed one would grow
    whatever holds the inf. The update prunes to the scheduled count and grows nothing."""
    trainer = make_trainer(tmp_path)
    cap = Capture(trainer)
    batches = iter(trainer.loaders.train)
    run_to(trainer, batches, lambda t: t.step > 0 and bool(t.schedule.updates_at(t.step)))
    model, step = trainer.model, trainer.step
    (k,) = trainer.schedule.updates_at(step)
    cap.poison = model.sparse_weights()[0]
    weights = [w.detach().clone() for w in model.sparse_weights()]
    old = [m.clone() for m in model.masks(k)]
    target = trainer.schedule.target_count(k, step, sum(w.numel() for w in weights))
    trainer.train_step(*next(batches))
    new = model.masks(k)
    assert not any(bool((n & ~o).any()) for n, o in zip(new, old, strict=True)), "grew"
    assert sum(int(n.sum()) for n in new) == target
    want = global_magnitude_prune(weights, old, target)
    assert all(torch.equal(a, b) for a, b in zip(new, want, strict=True))
