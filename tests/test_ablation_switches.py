"""Config switches that follow the authors' released code instead of the paper's rules
(issue 14, item 3; docs/algorithm.md, "Options that follow the authors' code").

Each switch is checked against a computation written out here, so a switch the code
ignores fails: ``ast.regrow_init``, ``optim.inactive_weights``,
``optim.batchnorm_weight_decay``, ``model.shared_batchnorm``, ``optim.lr_per``,
``ast.prune_scope``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dist_ast.cli import compose_config
from dist_ast.config import ConfigError, ModelConfig
from dist_ast.export import export_subnet, subnet_state_dict
from dist_ast.models import build_subnet_model
from dist_ast.sparsity import SwitchableBatchNorm2d
from dist_ast.subnets_io import load_subnet_model
from tests.cli_utils import dist_ast_train, torchrun
from tests.deps import require
from tests.trainer_utils import RAMP60, cpu_trainer

# plain SGD + weight decay (no nesterov) so the expected updates are short to write out
BASE = [*RAMP60, "optim.weight_decay=1e-2", "optim.nesterov=false"]

# every switch at its authors' value (tiny_cnn: its first BatchNorm is `bn1`)
AUTHORS = [
    "ast.regrow_init=kept",
    "optim.inactive_weights=moving",
    "optim.batchnorm_weight_decay=true",
    "optim.lr_per=epoch",
    "model.shared_batchnorm=[bn1]",
    "ast.prune_scope=shared",
]


def run_steps(trainer, n):
    batches = iter(trainer.loaders.train)
    for _ in range(n):
        x, y = next(batches)
        trainer.train_step(x, y)
        trainer.step += 1


def run_to_plain_step(trainer, warm: int = 7) -> None:
    """Run ``warm`` steps (momentum built up), then on to a step without a mask update."""
    run_steps(trainer, warm)
    while trainer.schedule.updates_at(trainer.step):
        run_steps(trainer, 1)


# -- ast.regrow_init -------------------------------------------------------------------
def _grow_one_fresh_weight(trainer):
    """Sub-net 0 grows position 40 of layer 1, live in no sub-net before; returns the
    weight, its value and momentum before, and the number of fresh weights reported."""
    model, opt = trainer.model, trainer.optimizer
    w = model.sparse_weights()[1]
    masks = []
    for k in range(model.num_subnets):
        mk = [m.clone() for m in model.masks(k)]
        mk[1] = torch.zeros_like(mk[1])
        mk[1].view(-1)[:10] = True
        masks.append(mk)
        model.set_masks(k, mk)
    with torch.no_grad():
        w.view(-1)[40] = 0.75
    opt.state[w]["momentum_buffer"].view(-1)[40] = 2.0
    new = [m.clone() for m in masks[0]]
    new[1].view(-1)[40] = True
    reset = trainer.updater.apply(0, new, opt)
    return (
        w.detach().view(-1)[40].item(),
        opt.state[w]["momentum_buffer"].view(-1)[40].item(),
        reset,
    )


@pytest.mark.parametrize(
    "overrides,weight,momentum",
    [
        ([], 0.0, 0.0),  # the paper's rule: a fresh weight starts at 0, zero momentum
        (["ast.regrow_init=kept"], 0.75, 0.0),  # keeps its frozen value; stale buffer zeroed
        # moving: the buffer moved with the weight every step, as in the authors' code
        (["ast.regrow_init=kept", "optim.inactive_weights=moving"], 0.75, 2.0),
    ],
)
def test_regrown_weight_kept_or_zero(tmp_path, overrides, weight, momentum):
    trainer = cpu_trainer(BASE, tmp_path, *overrides)
    run_steps(trainer, 3)  # momentum buffers exist
    got_w, got_m, reset = _grow_one_fresh_weight(trainer)
    assert (got_w, got_m, reset) == (weight, momentum, 1)
    assert trainer.model.masks(0)[1].view(-1)[40]


# -- optim.inactive_weights ----------------------------------------------------------
def _one_step_of_both(tmp_path):
    """The same plain step under frozen and moving from the same state."""
    out = {}
    for mode in ("frozen", "moving"):
        trainer = cpu_trainer(BASE, tmp_path / mode, f"optim.inactive_weights={mode}")
        run_to_plain_step(trainer)
        k = trainer.schedule.active_subnet(trainer.step)
        model, opt = trainer.model, trainer.optimizer
        before = {
            "w": [w.detach().clone() for w in model.sparse_weights()],
            "buf": [opt.state[w]["momentum_buffer"].clone() for w in model.sparse_weights()],
            "bn": {
                n: (m.weight.detach().clone(), m.bias.detach().clone())
                for n, m in model.named_modules()
                if isinstance(m, SwitchableBatchNorm2d)
            },
        }
        masks = [m.clone() for m in model.masks(k)]
        run_steps(trainer, 1)
        out[mode] = (trainer, k, masks, before)
    return out


def test_inactive_weights_move_by_decay_and_momentum_only_when_moving(tmp_path):
    runs = _one_step_of_both(tmp_path)
    frozen, moving = runs["frozen"], runs["moving"]
    for trainer, k, masks, before in (frozen, moving):
        opt = trainer.optimizer
        group = opt.param_groups[0]
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        assert wd == 1e-2 and mu == 0.9 and lr > 0
        model = trainer.model
        moved = 0
        for i, w in enumerate(model.sparse_weights()):
            off = ~masks[i]
            old, buf = before["w"][i][off], before["buf"][i][off]
            now, now_buf = w.detach()[off], opt.state[w]["momentum_buffer"][off]
            if trainer is frozen[0]:  # DESIGN §1.3: bit-identical, weight and momentum
                assert torch.equal(now, old) and torch.equal(now_buf, buf)
            else:  # plain SGD with a zero gradient there: d = wd·w, b' = μb + d, w -= lr·b'
                assert torch.equal(w.grad[off], torch.zeros_like(old))
                # float32 rounding of the written-out formula: a few ulps of |w| and |b|
                want_buf = mu * buf + wd * old
                torch.testing.assert_close(now_buf, want_buf, rtol=1e-5, atol=1e-9)
                want = old - lr * (wd * old + mu * buf)
                torch.testing.assert_close(now, want, rtol=1e-5, atol=1e-9)
                moved += int((now != old).sum())
        if trainer is moving[0]:
            assert moved > 0
        # switchable BatchNorm rows of the other sub-nets stay put in both modes
        others = [j for j in range(model.num_subnets) if j != k]
        for name, m in model.named_modules():
            if isinstance(m, SwitchableBatchNorm2d):
                w0, b0 = before["bn"][name]
                assert torch.equal(m.weight.detach()[others], w0[others])
                assert torch.equal(m.bias.detach()[others], b0[others])


def test_moving_still_masks_the_forward(tmp_path):
    trainer = cpu_trainer(BASE, tmp_path, "optim.inactive_weights=moving")
    run_steps(trainer, 5)
    model = trainer.model.eval()
    x = next(iter(trainer.loaders.val))[0][:4]
    for k in range(model.num_subnets):
        model.set_subnet(k)
        ref = model(x)
        with torch.no_grad():
            saved = [w.detach().clone() for w in model.sparse_weights()]
            for w, m in zip(model.sparse_weights(), model.masks(k), strict=True):
                w[~m] = 123.0  # weights off m_k: no effect on sub-net k's output
        assert torch.equal(model(x), ref)
        with torch.no_grad():
            for w, s in zip(model.sparse_weights(), saved, strict=True):
                w.copy_(s)


# -- optim.batchnorm_weight_decay ----------------------------------------------------
@pytest.mark.parametrize("decay", [False, True])
def test_batchnorm_and_biases_decay_only_when_asked(tmp_path, decay):
    trainer = cpu_trainer(
        BASE,
        tmp_path,
        "optim.momentum=0",
        f"optim.batchnorm_weight_decay={str(decay).lower()}",
    )
    run_to_plain_step(trainer)
    k = trainer.schedule.active_subnet(trainer.step)
    model = trainer.model
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and p.ndim == 1]
    assert bns and biases  # tiny_cnn: switchable BNs, and the classifier's bias
    before = [p.detach().clone() for m in bns for p in (m.weight, m.bias)]
    before_b = [p.detach().clone() for p in biases]
    run_steps(trainer, 1)
    lr, wd = trainer.optimizer.param_groups[0]["lr"], 1e-2
    c = wd if decay else 0.0
    params = [p for m in bns for p in (m.weight, m.bias)]
    for p, old in zip(params, before, strict=True):  # row k: w -= lr·(g + c·w)
        want = old[k] - lr * (p.grad[k] + c * old[k])
        torch.testing.assert_close(p.detach()[k], want, rtol=1e-6, atol=1e-9)
        others = [j for j in range(model.num_subnets) if j != k]
        assert torch.equal(p.detach()[others], old[others])
    for p, old in zip(biases, before_b, strict=True):
        torch.testing.assert_close(p.detach(), old - lr * (p.grad + c * old), rtol=1e-6, atol=1e-9)
    # the two formulas differ measurably: a switch that is ignored fails one of them
    p, old = params[0], before[0]
    assert (p.detach()[k] - (old[k] - lr * p.grad[k])).abs().max() == pytest.approx(
        lr * c * old[k].abs().max().item(), rel=1e-3, abs=1e-12
    )


# -- model.shared_batchnorm ----------------------------------------------------------
def test_resnet20_authors_layout_shares_stem_and_shortcut_batchnorms():
    cfg = compose_config(
        ["experiment=r20_cifar_ast", "model.shared_batchnorm=[bn1,*.shortcut.1]"]
    ).model
    model = build_subnet_model(cfg, 3)
    plain = [n for n, m in model.net.named_modules() if type(m) is nn.BatchNorm2d]
    switchable = [n for n, m in model.net.named_modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert plain == ["bn1", "layer2.0.shortcut.1", "layer3.0.shortcut.1"]
    assert len(switchable) == 18 and all(n.endswith((".bn1", ".bn2")) for n in switchable)
    # no shared BatchNorm in the optimizer's update masks: every sub-net moves it
    masks = model.update_masks([1])
    shared = [p for n, m in model.net.named_modules() if n in plain for p in m.parameters()]
    assert shared and not any(p in masks for p in shared)


@pytest.mark.parametrize("patterns", ["[nope]", "[bn1,layer9.*]"])
def test_shared_batchnorm_pattern_matching_nothing_is_refused(patterns):
    cfg = compose_config(["experiment=demo", f"model.shared_batchnorm={patterns}"]).model
    with pytest.raises(ConfigError, match=r"invalid model\.shared_batchnorm=.*matches no") as e:
        build_subnet_model(cfg, 3)
    assert "\n" not in str(e.value)


def test_shared_batchnorm_is_plain_and_trained_by_every_subnet(tmp_path):
    trainer = cpu_trainer(BASE, tmp_path, "model.shared_batchnorm=[bn1]")
    model = trainer.model
    bn = model.net.bn1
    assert type(bn) is nn.BatchNorm2d and bn.weight.shape == (8,)
    for t in range(6):  # every step moves it, whichever sub-net trains
        w0, mean0 = bn.weight.detach().clone(), bn.running_mean.clone()
        run_steps(trainer, 1)
        assert not torch.equal(bn.weight.detach(), w0), f"step {t}"
        assert not torch.equal(bn.running_mean, mean0), f"step {t}"
    assert int(bn.num_batches_tracked) == 6
    # the other BatchNorms stay switchable: each sub-net's set counted 2 of the 6 steps
    other = next(m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d))
    assert other.num_batches_tracked.tolist() == [2, 2, 2]
    # consumers: channels_last, evaluation, export of one sub-net, a state_dict round trip
    trainer.evaluate()
    for k in range(model.num_subnets):
        state = subnet_state_dict(model, k)
        assert torch.equal(state["bn1.weight"], bn.weight.detach())
        export_subnet(trainer.config, model, k)  # strict load into the plain model
    again = build_subnet_model(trainer.config.model, 3)
    again.load_state_dict(model.state_dict(), strict=True)
    model.to_channels_last()
    model.set_subnet(1)
    model.eval()(
        next(iter(trainer.loaders.val))[0][:2].contiguous(memory_format=torch.channels_last)
    )


# -- optim.lr_per --------------------------------------------------------------------
def test_lr_held_for_the_epoch_only_when_asked(tmp_path):
    for per in ("step", "epoch"):
        trainer = cpu_trainer(BASE, tmp_path / per, f"optim.lr_per={per}")
        s, total, peak = len(trainer.loaders.train), trainer.schedule.total_steps, 0.05
        assert trainer.config.optim.lr == peak and trainer.config.optim.warmup_epochs == 0
        assert 1 < s < total
        for step in (0, 5, s - 1, s, s + 7):
            trainer.step = step
            at = step if per == "step" else (step // s) * s  # cosine, no warmup
            want = peak * 0.5 * (1 + math.cos(math.pi * at / total))
            assert trainer.set_lr() == pytest.approx(want, rel=1e-12)
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)


# -- every switch at once, from the command line ---------------------------------------
def test_cli_run_with_every_authors_switch_finishes(tmp_path):
    run_dir = tmp_path / "run"
    # the first 14 steps of RAMP60: every sub-net updates its masks, sub-net 0 twice
    steps = "train.stop_after_steps=14"
    proc = dist_ast_train(*RAMP60, steps, "train.tensorboard=false", f"run_dir={run_dir}", *AUTHORS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 14
    assert all(s["top1"] is not None for s in summary["subnets"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("mask_update" in r for r in records)  # a regrowth ran under kept
    config, model = load_subnet_model(run_dir / "model.pt")
    assert config.optim.inactive_weights == "moving" and config.ast.regrow_init == "kept"
    assert type(model.net.bn1) is nn.BatchNorm2d


# -- ast.prune_scope ------------------------------------------------------------------
def _decide_with_a_large_weight_outside_subnet_0(tmp_path, scope, step_of):
    """Sub-net 0 lacks position 7 of layer 1, which sub-net 1 holds at |w| = 100; returns
    sub-net 0's decision at ``step_of(schedule)`` (no regrowth), its masks before, and the
    weights."""
    trainer = cpu_trainer(
        BASE,
        tmp_path / scope,
        f"ast.prune_scope={scope}",
        "ast.regrow_fraction=0",
        "ast.regrow_fraction_min=0",
    )
    model = trainer.model
    weights = model.sparse_weights()
    with torch.no_grad():
        for w in weights:  # distinct magnitudes: no ties to break
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
        weights[1].view(-1)[7] = 100.0
    own = [torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.9 for w in weights]
    own[1].view(-1)[7] = False
    model.set_masks(0, own)
    other = [m.clone() for m in own]
    other[1].view(-1)[7] = True
    model.set_masks(1, other)
    grads = [torch.zeros_like(w) for w in weights]
    return trainer.updater.decide(0, step_of(trainer.schedule), grads), own, weights


def _flat(masks):
    return torch.cat([m.reshape(-1) for m in masks])


def _top_by_magnitude(weights, candidates, keep):
    """The ``keep`` largest |w| among ``candidates``, by a full sort written out here."""
    flat_w = _flat(weights).detach().abs()
    flat_c = _flat(candidates)
    order = torch.sort(torch.where(flat_c, flat_w, -1.0), descending=True, stable=True).indices
    chosen = torch.zeros_like(flat_c)
    chosen[order[:keep]] = True
    return chosen


def test_shared_prune_scope_ranks_the_whole_tensor_during_the_ramp(tmp_path):
    """Inside the ramp, shared picks sub-net 0's weights from every entry (so position 7,
    held large by sub-net 1, comes back); subnet ranks sub-net 0's live weights only."""
    runs = {  # at step 12, sub-net 0's second update (ΔT = 12), inside the ramp
        s: _decide_with_a_large_weight_outside_subnet_0(tmp_path, s, lambda schedule: 12)
        for s in ("subnet", "shared")
    }
    new, own, weights = runs["shared"]
    keep = sum(int(m.sum()) for m in new)
    assert keep < sum(int(m.sum()) for m in own)  # the ramp prunes at this step
    everything = [torch.ones_like(m) for m in own]
    assert torch.equal(_flat(new), _top_by_magnitude(weights, everything, keep))
    assert new[1].view(-1)[7]
    new, own, weights = runs["subnet"]
    assert torch.equal(_flat(new), _top_by_magnitude(weights, own, keep))
    assert not new[1].view(-1)[7]


def test_shared_prune_scope_is_the_subnet_rule_after_the_ramp(tmp_path):
    def after_ramp(schedule):  # an update scheduled after the ramp's end
        return schedule.ramp_end + schedule.update_every

    (shared, own, _), (subnet, _, _) = (
        _decide_with_a_large_weight_outside_subnet_0(tmp_path, s, after_ramp)
        for s in ("shared", "subnet")
    )
    assert sum(int(m.sum()) for m in shared) < sum(int(m.sum()) for m in own)  # it pruned
    assert all(torch.equal(a, b) for a, b in zip(shared, subnet, strict=True))
    assert not shared[1].view(-1)[7]


# -- config validation -----------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["ast.regrow_init=random"], r"invalid ast\.regrow_init='random': choose one of"),
        (["optim.inactive_weights=drift"], r"invalid optim\.inactive_weights='drift': choose"),
        (["optim.lr_per=batch"], r"invalid optim\.lr_per='batch': choose one of"),
        (["ast.prune_scope=all"], r"invalid ast\.prune_scope='all': choose one of"),
        (
            ["ast.prune_scope=shared", "ast.mask_relation=completely_subset"],
            r"invalid ast\.prune_scope='shared': .*use prune_scope=subnet",
        ),
        (["model.shared_batchnorm=['']"], r"invalid model\.shared_batchnorm=\[''\]: give"),
        (
            ["engine=deepspeed", "optim.inactive_weights=moving"],
            r"invalid optim\.inactive_weights='moving': .*engine=ddp only.*use engine=ddp",
        ),
        (
            ["engine=deepspeed", "ast.regrow_init=kept"],
            r"invalid ast\.regrow_init='kept': .*engine=ddp only.*use engine=ddp",
        ),
    ],
)
def test_bad_switch_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        compose_config(["experiment=demo", *overrides])
    assert "\n" not in str(e.value)


def test_defaults_are_the_paper_rules():
    c = compose_config(["experiment=demo"])
    assert c.ast.regrow_init == "zero"
    assert c.optim.inactive_weights == "frozen"
    assert c.optim.batchnorm_weight_decay is False
    assert c.optim.lr_per == "step"
    assert c.ast.prune_scope == "subnet"
    assert c.model.shared_batchnorm == []
    assert ModelConfig().shared_batchnorm == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_every_authors_switch_finish(tmp_path):
    """DDP's compact all-reduce hook, the BatchNorm averaging and the mask broadcast with
    a plain shared BatchNorm and moving inactive weights (torchrun, 2 gloo ranks)."""
    run_dir = tmp_path / "two"
    proc = torchrun(
        "dist_ast.train",
        *RAMP60,
        "train.stop_after_steps=14",
        "train.tensorboard=false",
        f"run_dir={run_dir}",
        *AUTHORS,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 14


# the switches that engine=deepspeed accepts (moving and kept need engine=ddp)
DDP_ONLY = ("ast.regrow_init", "optim.inactive_weights")
ENGINE_FREE = [a for a in AUTHORS if a.split("=")[0] not in DDP_ONLY]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_follows_the_switches_as_ddp_does(tmp_path):
    """engine=deepspeed builds its own flat fp32 partitions and param groups: with weight
    decay on BatchNorm, a plain shared BatchNorm, the lr held per epoch and the shared
    prune scope, 14 steps on 2 ranks end where engine=ddp's do (same split; fp32 sums in
    another order), masks equal. Weight decay 1e-2 moves a BatchNorm weight ~1e-3 a step,
    so a dropped switch would be 100x the tolerance."""
    require("deepspeed")  # pinned in constraints.txt: a missing one fails, never skips
    states = {}
    for engine in ("ddp", "deepspeed"):
        run_dir = tmp_path / engine
        proc = torchrun(
            "dist_ast.train",
            *BASE,
            "train.stop_after_steps=14",
            "train.tensorboard=false",
            f"engine={engine}",
            f"run_dir={run_dir}",
            *ENGINE_FREE,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        states[engine] = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    ddp, ds = states["ddp"], states["deepspeed"]
    assert any(v.dtype == torch.bool for v in ddp.values())  # the masks are compared too
    # masks and counters exactly (integer dtypes), float tensors within 1e-4
    torch.testing.assert_close(ds, ddp, atol=1e-4, rtol=0)
