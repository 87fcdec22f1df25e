"""DESIGN §2 "host syncs": an ordinary step reads at most one value back to the host, and
GC's device-side projection is the paper's formula, wired into the trainer.

On a GPU every Python-level read of a device tensor (``.item()``, ``float()``, ``bool()``,
``int()``, ``tolist()``, a 0-dim tensor in an f-string) blocks the host until the
device has caught up. These tests run on CPU, where such reads cost nothing, and count
them instead by patching those methods of ``torch.Tensor``: what is counted here would
be a stall there. (C++-side syncs such as ``nonzero`` are not visible to this count; on a
GPU, ``torch.cuda.set_sync_debug_mode`` sees those.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch

from tests.trainer_utils import RAMP60, cpu_trainer

READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Count calls of the Tensor methods that copy a value to the host (list of names)."""
    seen: list[str] = []
    patches = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            seen.append(_name)
            return _orig(self, *a, **k)

        patches.append(mock.patch.object(torch.Tensor, name, spy))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield seen


def make_trainer(tmp_path, *extra):
    return cpu_trainer(RAMP60, tmp_path, *extra)


def ordinary(trainer) -> bool:
    """Neither a group start (GC compares) nor a mask update nor the step before one."""
    s, sched = trainer.step, trainer.schedule
    return not sched.is_group_start(s) and not sched.updates_at(s)


class _Checkpointer:
    """Step-boundary stand-in: no trigger due (the real one reads the wall clock only)."""

    minutes_due = False

    def finish_pending(self, wait: bool) -> None:
        pass

    def steps_due(self, step: int) -> bool:
        return False


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="ast_gc-fp32"),
        pytest.param(("ast=ast", "ast.count_conflicts=true"), id="ast-counting-fp32"),
        pytest.param(("train.precision=fp16",), id="ast_gc-fp16-gradscaler"),
        pytest.param(("train.precision=bf16",), id="ast_gc-bf16"),
    ],
)
def test_ordinary_step_reads_the_host_at_most_once(tmp_path, extra):
    """train_step + the progress bar + the step boundary, as fit runs them on a step that
    neither logs nor updates masks. The one read allowed is GradScaler's own skip check."""
    from dist_ast.preemption import PreemptionHandler
    from dist_ast.progress import training_progress

    trainer = make_trainer(tmp_path, *extra)
    batches = iter(trainer.loaders.train)
    preemption = PreemptionHandler(signals=())
    counts = []
    with training_progress(60, enabled=True) as bar:
        while len(counts) < 6:
            x, y = next(batches)
            if trainer.step < 4 or not ordinary(trainer):  # warm-up: buffers, g_prev exist
                out = trainer.train_step(x, y)
                trainer.step += 1
                continue
            with count_host_reads() as reads:
                out = trainer.train_step(x, y)
                trainer.step += 1
                bar.update(trainer.step, out)
                trainer.step_boundary(_Checkpointer(), preemption)
            counts.append(list(reads))
    assert all(len(c) <= 1 for c in counts), [len(c) for c in counts]
    assert trainer.gc.steps_checked > 0  # the counted steps ran GC's comparison
    # the loss stays on the device until a log step reads it
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].requires_grad is False


def test_preemption_agreement_uses_a_cpu_tensor(tmp_path, monkeypatch):
    """The flags go through the CPU backend (gloo beside NCCL), never the training device:
    a device tensor there would be a round trip to the GPU on every step."""
    from dist_ast import preemption

    trainer = make_trainer(tmp_path)
    sent = []

    def all_reduce(t, op=None, group=None):
        sent.append(t.device.type)

    monkeypatch.setattr(preemption.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(preemption.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(preemption.dist, "all_reduce", all_reduce)
    # a training device whose tensors cannot be read back: only a CPU tensor works
    trainer.dist = dataclasses.replace(trainer.dist, device=torch.device("meta"))
    trainer.step_boundary(_Checkpointer(), preemption.PreemptionHandler(signals=()))
    assert sent == ["cpu"]


def _expected_direction(g, prev, masks):
    """DESIGN §1.9 written out on flat float64 vectors: project g when g·ĝ < 0."""
    flat_g = torch.cat([t.reshape(-1).double() for t in g])
    if prev is None:
        return flat_g, None
    g_hat = torch.cat([(p * m).reshape(-1).double() for p, m in zip(prev, masks, strict=True)])
    dot = float(flat_g @ g_hat)
    if dot < 0:
        flat_g = flat_g - dot / float(g_hat @ g_hat) * g_hat
    return flat_g, dot


def unflatten(flat, like):
    parts = flat.split([t.numel() for t in like])
    return [p.view_as(t).float() for p, t in zip(parts, like, strict=True)]


def test_trainer_applies_the_gc_projection_and_counts_conflicts(tmp_path):
    """No momentum or decay, so each step moves w by −lr·(applied direction): compare it
    with the projection computed here from the masked gradient and this test's own
    record of the previous applied direction; the conflict counter, read once at the
    end, equals the conflicts found here."""
    trainer = make_trainer(
        tmp_path, "optim.momentum=0", "optim.weight_decay=0", "optim.nesterov=false"
    )
    model = trainer.model
    weights = model.sparse_weights()
    captured = {}
    original = trainer.forward_backward

    def capture(subnets, x, y):
        out = original(subnets, x, y)
        captured["grads"] = [w.grad.detach().clone() for w in weights]
        return out

    trainer.forward_backward = capture
    batches = iter(trainer.loaders.train)
    prev, checked, conflicts, projected = None, 0, 0, 0
    for _ in range(24):
        x, y = next(batches)
        step = trainer.step
        k = trainer.schedule.active_subnet(step)
        masks = [m.clone() for m in model.masks(k)]
        before = [w.detach().clone() for w in weights]
        out = trainer.train_step(x, y)
        trainer.step += 1
        g = [gr * m for gr, m in zip(captured["grads"], masks, strict=True)]
        group_start = trainer.schedule.is_group_start(step)
        want, dot = _expected_direction(g, None if group_start else prev, masks)
        if dot is not None:
            checked += 1
            conflicts += dot < 0
        moved = [(b - w.detach()).reshape(-1) for b, w in zip(before, weights, strict=True)]
        got = torch.cat(moved).double() / out["lr"]
        scale = want.abs().max()
        prev = unflatten(want, weights)
        if trainer.schedule.updates_at(step):  # regrown weights are reset after the update
            continue
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(scale)), step
        if dot is not None and dot < 0:
            raw = torch.cat([t.reshape(-1).double() for t in g])
            assert not torch.allclose(got, raw, rtol=1e-3, atol=1e-4 * float(scale))
            projected += 1
    assert projected > 0, "no conflicting step: the test checked no projection"
    assert (trainer.gc.steps_checked, trainer.gc.conflicts) == (checked, conflicts)


def test_progress_bar_shows_the_logged_loss_only():
    """Between log steps the loss is a tensor and the bar leaves it unread; once a log
    step has turned it into a float (log_metrics runs after the bar's update in fit),
    the bar shows it from the next update on."""
    from dist_ast.progress import training_progress

    with training_progress(10, enabled=True) as bar:
        out = {"loss": torch.tensor(2.5), "lr": 0.1, "subnet": 0}
        with count_host_reads() as reads:
            bar.update(1, out)
        assert reads == [] and "loss" not in bar.progress.tasks[0].fields["info"]
        out["loss"] = float(out["loss"])  # what Trainer.log_metrics does on a log step
        bar.update(2, {"loss": torch.tensor(9.0), "lr": 0.1, "subnet": 1})
        assert "loss 2.500" in bar.progress.tasks[0].fields["info"]
