"""The non-finite guard: a diverged run stops before it saves NaN weights or ranks NaN
scores (train.nonfinite=stop), or drops the step and leaves everything as it was (skip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ast.errors import EXIT_NONFINITE
from dist_ast.nonfinite import NonFiniteError, nonfinite
from tests.cli_utils import TINY, assert_one_line, dist_ast_train
from tests.trainer_utils import DEMO40, cpu_trainer


def test_the_flag_sees_inf_and_nan_in_the_loss_and_in_any_gradient() -> None:
    finite = [torch.ones(3), torch.full((2, 2), 3e38)]  # huge but finite: no overflow
    assert not nonfinite(torch.tensor(1.0), finite)
    assert nonfinite(torch.tensor(float("nan")), finite)
    assert nonfinite(torch.tensor(1.0), [torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert nonfinite(torch.tensor(1.0), [torch.tensor([float("nan")])])


def state(trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, s in enumerate(trainer.optimizer.state.values()):
        out.update({f"optim.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    for i, g in enumerate(trainer.gc.prev or []):
        out[f"gc.prev.{i}"] = g.clone()
    return out


def run_steps(trainer, batches, n: int, poison: set[int] = frozenset()) -> list[dict]:
    outs = []
    for _ in range(n):
        x, y = next(batches)
        if trainer.step in poison:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        outs.append(trainer.train_step(x, y))
        trainer.step += 1
    return outs


def test_skip_drops_the_step_and_leaves_every_state_bit_identical(tmp_path: Path) -> None:
    trainer = cpu_trainer(DEMO40, tmp_path, "train.nonfinite=skip")
    batches = iter(trainer.loaders.train)
    run_steps(trainer, batches, 13)  # past the first mask updates, GC and momentum live
    before, checked, conflicts = state(trainer), trainer.gc.steps_checked, trainer.gc.conflicts
    assert trainer.schedule.updates_at(16) and len(trainer.gc.prev or []) > 0
    for step in (13, 14, 15, 16):  # 16: a mask-update step, dropped with its update
        (out,) = run_steps(trainer, batches, 1, poison={step})
        assert out.get("skipped") and out["mask_update"] is None
    after = state(trainer)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed  # weights, masks, BN statistics, momentum, g_prev
    assert (trainer.gc.steps_checked, trainer.gc.conflicts) == (checked, conflicts)
    assert trainer.guard.skipped == 4 and all(m["step"] != 16 for m in trainer.mask_updates)
    run_steps(trainer, batches, 1)  # a finite step trains again
    assert trainer.guard.consecutive == 0
    assert not torch.equal(state(trainer)["model.net.fc.weight"], after["model.net.fc.weight"])


def test_skip_gives_up_after_max_skipped_consecutive_steps(tmp_path: Path) -> None:
    trainer = cpu_trainer(DEMO40, tmp_path, "train.nonfinite=skip", "train.max_skipped=2")
    batches = iter(trainer.loaders.train)
    run_steps(trainer, batches, 2, poison={0, 1})
    with pytest.raises(NonFiniteError, match=r"step 2 .*3 consecutive .*max_skipped=2"):
        run_steps(trainer, batches, 1, poison={2})


def test_stop_raises_before_the_mask_update_ranks_nan(tmp_path: Path) -> None:
    """The default: a poisoned step is remembered on the device; the next mask update
    (which would rank NaN magnitudes) stops the run naming that step."""
    trainer = cpu_trainer(DEMO40, tmp_path)
    batches = iter(trainer.loaders.train)
    run_steps(trainer, batches, 14, poison={13})
    masks = [m.clone() for m in trainer.model.masks(0)]
    updates = len(trainer.mask_updates)
    with pytest.raises(NonFiniteError, match=r"step 13 \(sub-net 1\): the loss \(nan\)"):
        run_steps(trainer, batches, 3)  # step 16 updates sub-net 1's masks
    assert len(trainer.mask_updates) == updates
    assert all(torch.equal(a, b) for a, b in zip(masks, trainer.model.masks(0), strict=True))


@pytest.mark.slow
def test_diverged_run_stops_with_one_line_and_keeps_the_good_checkpoints(tmp_path: Path) -> None:
    """The issue's reproduction: the demo at optim.lr=10000 turns NaN; the run stops at
    the first read (a log step, a save or a mask update) with exit 5, naming the newest
    good checkpoint, and rotation kept it."""
    run_dir = tmp_path / "run"
    proc = dist_ast_train(
        *TINY[:-1], "optim.lr=10000", f"run_dir={run_dir}", "train.stop_after_steps=120",
        "checkpoint.every_steps=10", "checkpoint.keep=1", "train.log_every=10",
    )  # fmt: skip
    assert_one_line(proc, EXIT_NONFINITE, "non-finite", "newest good checkpoint is")
    kept = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(kept) == 1 and str(kept[0]) in proc.stderr
    saved = int(kept[0].name.split("-")[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_bad = int(proc.stderr.split("non-finite: step ")[1].split(" ")[0])
    assert saved <= first_bad  # nothing saved from a non-finite step on
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(x == x for x in losses), "the guard stops before a NaN is logged"
    assert max(r["step"] for r in records) <= first_bad + 1
    assert not (run_dir / "summary.json").exists()
