"""Every rule of DESIGN §1, checked on the real trainer against a computation written out
here, not against the code's own helpers.

The independent pieces are all in this file:

* ``ref_forward``: the tiny CNN as plain ``F.conv2d``/``F.batch_norm``/``F.linear`` calls,
  with each sparse layer's weight entering as the leaf tensor w ⊙ m_k (so its gradient is
  the dense gradient ∂L/∂(w ⊙ m_k)) and BatchNorm row k;
* ``ref_sgd``: masked SGD (momentum, nesterov, weight decay on conv/linear weights only),
  moving only m_k and BatchNorm row k;
* ``ref_gc``: gradient correction in float64 on the flat masked gradient;
* ``sparsity_at`` / ``nm_fraction_at``: the cubic ramp; ``hand_flops``: per-layer FLOPs
  of the tiny CNN counted by hand; ``top_set``: exact top-n by a stable sort.

Only public behaviour is read: the trainer's model (weights, masks, BatchNorm rows), the
optimizer's ``state`` and step hooks (torch API), ``metrics.jsonl`` and the summary.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dist_ast.cli import compose_config
from dist_ast.distributed.setup import DistInfo
from dist_ast.train import build_trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
N = 3
SPARSITIES = (0.5, 0.8, 0.9)
S_INIT = 0.2
STEPS = 60
BATCH = 32
WIDTH = 8
IMAGE = 16
T0, T1 = 0, 1500 // BATCH  # ramp over one epoch of the 1,500 training digits: 46 steps
DELTA_T, DELTA_TAU = 12, 5  # Δτ = 5 is not a multiple of N: updates move to k's own step
LR = 0.05  # experiment=demo's optim.lr; no warmup, cosine to 0 over STEPS
SPARSE = ["body.0", "body.3", "body.6", "fc"]  # tiny_cnn: first conv dense, classifier sparse
BNS = ["bn1", "body.1", "body.4", "body.7"]

BASE = [
    "experiment=demo",
    f"train.max_steps={STEPS}",
    f"train.batch_size={BATCH}",
    f"data.image_size={IMAGE}",
    f"model.width={WIDTH}",
    "train.progress=false",
    "train.tensorboard=false",
    "train.final_eval=false",
    "train.log_every=1",
    "checkpoint.every_steps=0",
    f"ast.initial_sparsity={S_INIT}",
    "ast.ramp_start_epoch=0",
    "ast.ramp_end_epoch=1",
    f"ast.update_every={DELTA_T}",
    f"ast.stagger={DELTA_TAU}",
]


def make_trainer(run_dir, *extra):
    cfg = compose_config([*BASE, f"run_dir={run_dir}", *extra])
    trainer = build_trainer(cfg, CPU)
    assert trainer.model.sparse_names == SPARSE
    return trainer


# --------------------------------------------------------------------------- formulas


def sparsity_at(k: int, t: float) -> float:
    """DESIGN §1.6: s(t) = s_k + (s_i - s_k)(1 - (t - t0)/(t1 - t0))^3 on [t0, t1]."""
    if t <= T0:
        return S_INIT
    if t >= T1:
        return SPARSITIES[k]
    return SPARSITIES[k] + (S_INIT - SPARSITIES[k]) * (1 - (t - T0) / (T1 - T0)) ** 3


def regrow_fraction_at(t: int, total: int = STEPS) -> float:
    """DESIGN §1.7: r(t) = r_min + (r_0 - r_min)(1 + cos(pi t / T))/2."""
    r0, rmin = 0.5, 0.005
    return rmin + (r0 - rmin) * (1 + math.cos(math.pi * t / total)) / 2


def lr_at(t: int, peak: float = LR) -> float:
    """No warmup, then cosine from the peak to 0 over the run."""
    return peak * 0.5 * (1 + math.cos(math.pi * t / STEPS))


def expected_update_steps(k: int) -> list[int]:
    """DESIGN §1.8: sub-net k's updates are scheduled at t0 + k·Δτ + j·ΔT (global steps)
    and carried out at the first step at or after that on which k trains (t ≡ k mod N)."""
    out = []
    s = T0 + k * DELTA_TAU
    while s < STEPS:
        t = s
        while t % N != k:
            t += 1
        if t < STEPS:
            out.append(t)
        s += DELTA_T
    return out


def hand_forward_macs(width: int = WIDTH, size: int = IMAGE) -> dict[str, int]:
    """Multiply-adds per sample of tiny_cnn, by hand: outputs x (in channels x 3 x 3)."""
    w = width
    return {
        "conv1": (w * size * size) * (3 * 9),  # 3x3, pad 1, stride 1
        "body.0": (2 * w * (size // 2) ** 2) * (w * 9),  # stride 2
        "body.3": (4 * w * (size // 4) ** 2) * (2 * w * 9),
        "body.6": (4 * w * (size // 8) ** 2) * (4 * w * 9),
        "fc": 4 * w * 10,
    }


def hand_step_flops(densities: dict[str, float]) -> float:
    """One training step of one sub-net: forward + backward (2 x forward), 2 FLOPs per
    multiply-add, each sparse layer scaled by its density, the first conv dense."""
    macs = hand_forward_macs()
    fwd = 2 * (macs["conv1"] + sum(macs[n] * densities[n] for n in SPARSE))
    return 3 * fwd * BATCH


def top_set(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n largest scores (flat), ties to the lower index: a stable sort."""
    flat = scores.reshape(-1)
    order = torch.sort(-flat.double(), stable=True).indices[:n]
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order] = True
    return out.view_as(scores)


# --------------------------------------------------------------------------- reference model


def snapshot(trainer) -> dict:
    model = trainer.model
    moms = {}
    for name, p in model.named_parameters():
        buf = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
        moms[name] = None if buf is None else buf.detach().clone()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "masks": [[m.clone() for m in model.masks(k)] for k in range(N)],
        "moms": moms,
    }


def ref_forward(snap: dict, k: int, x: torch.Tensor, y: torch.Tensor, *, train: bool = True):
    """tiny_cnn written out: returns (logits, {param name: gradient}, {bn: (mean, var)}).

    Sparse weights enter as leaves v = w ⊙ m_k, so their gradient is ∂L/∂(w ⊙ m_k)
    (dense); BatchNorm uses row k of its [N, C] parameters and statistics.
    """
    p, b, masks = snap["params"], snap["buffers"], dict(zip(SPARSE, snap["masks"][k], strict=True))
    leaves: dict[str, torch.Tensor] = {}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def leaf(name: str, value: torch.Tensor) -> torch.Tensor:
        leaves[name] = value.detach().clone().requires_grad_(train)
        return leaves[name]

    def weight(layer: str) -> torch.Tensor:
        w = p[f"net.{layer}.weight"]
        return leaf(layer, w * masks[layer]) if layer in masks else leaf(layer, w)

    def bn(name: str, h: torch.Tensor) -> torch.Tensor:
        mean = b[f"net.{name}.running_mean"][k].clone()
        var = b[f"net.{name}.running_var"][k].clone()
        g = leaf(f"{name}.weight", p[f"net.{name}.weight"][k])
        beta = leaf(f"{name}.bias", p[f"net.{name}.bias"][k])
        out = F.batch_norm(h, mean, var, g, beta, train, 0.1, 1e-5)
        stats[name] = (mean, var)
        return torch.relu(out)

    h = bn("bn1", F.conv2d(x, weight("conv1"), None, 1, 1))
    for conv, norm in (("body.0", "body.1"), ("body.3", "body.4"), ("body.6", "body.7")):
        h = bn(norm, F.conv2d(h, weight(conv), None, 2, 1))
    logits = F.linear(h.mean(dim=(2, 3)), weight("fc"), leaf("fc.bias", p["net.fc.bias"]))
    grads = {}
    if train:
        F.cross_entropy(logits, y).backward()
        grads = {n: t.grad for n, t in leaves.items()}
    return logits.detach(), grads, stats


def ref_gc(g: list[torch.Tensor], prev: list[torch.Tensor] | None, mask: list, start: bool):
    """DESIGN §1.9 on the flat vector, in float64: (applied direction, g·ĝ or None)."""
    if start or prev is None:
        return [t.double() for t in g], None
    gf = torch.cat([t.double().reshape(-1) for t in g])
    hat = torch.cat([(q.double() * m).reshape(-1) for q, m in zip(prev, mask, strict=True)])
    dot = float(gf @ hat)
    if dot < 0:
        gf = gf - dot / float(hat @ hat) * hat
    out, i = [], 0
    for t in g:
        out.append(gf[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out, dot


def ref_sgd(snap, k, grads, sparse_dirs, *, lr, momentum, wd, nesterov):
    """Masked SGD (DESIGN §1.3): returns ({name: new value}, {name: new momentum})."""
    params, moms, masks = (
        snap["params"],
        snap["moms"],
        dict(zip(SPARSE, snap["masks"][k], strict=True)),
    )
    new_p, new_m = {}, {}
    for name, w in params.items():
        layer = name[len("net.") :].rsplit(".", 1)[0]
        kind = name.rsplit(".", 1)[1]
        if layer in masks and kind == "weight":
            g, where, decay = sparse_dirs[layer].to(w.dtype), masks[layer], wd
        elif layer in BNS:
            g = torch.zeros_like(w)
            g[k] = grads[f"{layer}.{kind}"]
            where = torch.zeros(N, 1, dtype=torch.bool)
            where[k] = True
            where, decay = where.expand_as(w), 0.0
        else:  # dense: the first conv (decayed) and the classifier's bias (not decayed)
            key = layer if kind == "weight" else f"{layer}.{kind}"
            g, where = grads[key], torch.ones_like(w, dtype=torch.bool)
            decay = wd if kind == "weight" else 0.0
        d = g + decay * w
        buf = moms[name] if moms[name] is not None else torch.zeros_like(w)
        if momentum:
            buf = torch.where(where, momentum * buf + d, buf)
            d = d + momentum * buf if nesterov else buf
        new_p[name] = torch.where(where, w - lr * d, w)
        new_m[name] = buf
    return new_p, new_m


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """‖a − b‖ ≤ rel·‖b‖ (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-12


# --------------------------------------------------------------------------- one real run


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """60 steps through ``Trainer.fit`` (metrics every step), with a forward pre-hook that
    records, at every training forward, every sub-net's masks and the BatchNorm state."""
    run_dir = tmp_path_factory.mktemp("fit")
    trainer = make_trainer(run_dir)
    model = trainer.model
    initial = {n: w.detach().clone() for n, w in zip(SPARSE, model.sparse_weights(), strict=True)}
    seen: list[dict] = []

    def record(module, args):
        if module.training:
            seen.append(
                {
                    "masks": [[m.clone() for m in model.masks(k)] for k in range(N)],
                    "bn": {
                        n: t.detach().clone()
                        for n, t in [*model.named_buffers(), *model.named_parameters()]
                        if n.rsplit(".", 1)[0][len("net.") :] in BNS
                    },
                }
            )

    handle = model.register_forward_pre_hook(record)
    summary = trainer.fit()
    handle.remove()
    final = {
        "masks": [[m.clone() for m in model.masks(k)] for k in range(N)],
        "bn": {
            n: t.detach().clone()
            for n, t in [*model.named_buffers(), *model.named_parameters()]
            if n.rsplit(".", 1)[0][len("net.") :] in BNS
        },
    }
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == STEPS
    return {
        "trainer": trainer,
        "summary": summary,
        "records": [r for r in records if "loss" in r],
        "before": seen,  # before[t]: the state step t's forward ran with
        "after": [*seen[1:], final],  # after[t]: the state once step t finished
        "initial": initial,
    }


def nnz(masks: list[torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks)


def test_alternation_trains_t_mod_n_and_only_its_batchnorm_row(fit_run):
    """Rules 2 and 4: step t trains sub-net t mod N (metrics), and of every BatchNorm
    only row t mod N (affine parameters and running statistics) changes."""
    records = fit_run["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["subnet"] for r in records] == [t % N for t in range(STEPS)]
    for t in range(STEPS):
        before, after = fit_run["before"][t]["bn"], fit_run["after"][t]["bn"]
        k = t % N
        others = [j for j in range(N) if j != k]
        for name, old in before.items():
            new = after[name]
            assert torch.equal(new[others], old[others]), f"step {t}: {name} row != {k} moved"
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert not torch.equal(new[k], old[k]), f"step {t}: {name} row {k} did not move"
    counts = fit_run["after"][-1]["bn"]["net.bn1.num_batches_tracked"]
    assert counts.tolist() == [STEPS // N] * N


def test_mask_updates_at_staggered_steps_and_nowhere_else(fit_run):
    """Rule 8: the hand-computed update steps, logged as ``mask_update`` in metrics.jsonl;
    masks change at those steps only, and only the updating sub-net's."""
    logged = {r["step"] - 1: r.get("mask_update") for r in fit_run["records"]}
    expected = {t: [k] for k in range(N) for t in expected_update_steps(k)}
    assert expected_update_steps(1)[0] == 7 and expected_update_steps(2)[0] == 11  # moved
    assert {t: u for t, u in logged.items() if u} == expected
    for t in range(STEPS):
        before, after = fit_run["before"][t]["masks"], fit_run["after"][t]["masks"]
        for k in range(N):
            same = all(torch.equal(a, b) for a, b in zip(before[k], after[k], strict=True))
            if expected.get(t) != [k]:
                assert same, f"sub-net {k}'s masks changed at step {t}, not its update step"
            else:
                assert not same, f"sub-net {k}'s update at step {t} left its masks as they were"


def test_mask_counts_follow_the_cubic_ramp(fit_run):
    """Rule 6: random initial masks with exactly round((1 - s_i)·total) live weights, the
    same for every sub-net; after every update of k at step t exactly
    round((1 - s(t))·total), s(t) the cubic written out here; s_k exactly from t1 on."""
    trainer = fit_run["trainer"]
    total = sum(w.numel() for w in trainer.model.sparse_weights())
    first = fit_run["before"][0]["masks"]
    assert all(nnz(first[k]) == round((1 - S_INIT) * total) for k in range(N))
    assert all(torch.equal(a, b) for k in range(N) for a, b in zip(first[0], first[k], strict=True))
    for m in first[0]:  # random over all layers: none empty or full
        assert abs(float(m.float().mean()) - (1 - S_INIT)) < 0.1
    checked = 0
    for t in range(STEPS):
        for k in range(N):
            if t in expected_update_steps(k):
                got = nnz(fit_run["after"][t]["masks"][k])
                assert got == round((1 - sparsity_at(k, t)) * total), (t, k)
                checked += 1
    assert checked == sum(len(expected_update_steps(k)) for k in range(N)) >= 12
    # the ramp is exercised away from its ends, where cubic and linear differ
    assert any(0.3 < (t - T0) / (T1 - T0) < 0.7 for t in expected_update_steps(0))
    for k, sub in enumerate(fit_run["summary"]["subnets"]):
        assert sub["nonzero"] == nnz(fit_run["after"][-1]["masks"][k])
        assert sub["nonzero"] == round((1 - SPARSITIES[k]) * total)
    for r, t in zip(fit_run["records"], range(STEPS), strict=True):  # logged sparsities
        for k in range(N):
            assert r["sparsity"][k] == pytest.approx(
                1 - nnz(fit_run["after"][t]["masks"][k]) / total, abs=1e-12
            )


def layer_densities(masks: list[torch.Tensor]) -> dict[str, float]:
    return {n: int(m.sum()) / m.numel() for n, m in zip(SPARSE, masks, strict=True)}


def test_training_flops_equal_the_hand_count(fit_run):
    """Rule 11: train_flops in metrics.jsonl after every step, and the summary's total and
    per-sub-net-alone figure, against FLOPs counted by hand: each step's passes at the
    densities of the masks its forward and backward ran with (before an update)."""
    total = individual = 0.0
    for t, r in enumerate(fit_run["records"]):
        masks = fit_run["before"][t]["masks"]
        total += hand_step_flops(layer_densities(masks[t % N]))
        individual += sum(hand_step_flops(layer_densities(masks[k])) for k in range(N))
        # rounding: an integer per step, and densities taken as float32 means (~6e-8)
        assert r["train_flops"] == pytest.approx(total, rel=2e-7, abs=t + 1), t
    summary = fit_run["summary"]
    assert summary["train_flops"] == pytest.approx(total, rel=2e-7, abs=STEPS)
    assert summary["train_flops_individual"] == pytest.approx(individual, rel=2e-7, abs=N * STEPS)
    dense = hand_step_flops(dict.fromkeys(SPARSE, 1.0))
    assert total < 0.7 * STEPS * dense  # the masks matter: a dense count is far off
    after = sum(
        hand_step_flops(layer_densities(fit_run["after"][t]["masks"][t % N])) for t in range(STEPS)
    )
    assert abs(after - total) > 1e-3 * total, "update steps make the two counts differ"


def test_each_subnet_evaluates_with_its_masks_and_batchnorm_row(fit_run):
    """Rules 1 and 4: sub-net k's eval logits are the plain network computed with w ⊙ m_k
    in every sparse layer and BatchNorm row k's statistics (written out in ref_forward)."""
    trainer = fit_run["trainer"]
    model = trainer.model
    x, y = next(iter(trainer.loaders.val))
    snap = snapshot(trainer)
    model.eval()
    outs = []
    with torch.no_grad():
        for k in range(N):
            model.set_subnet(k)
            got = model(x)
            ref, _, _ = ref_forward(snap, k, x, y, train=False)
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), f"sub-net {k}"
            outs.append(got)
    assert not torch.allclose(outs[0], outs[2], atol=1e-3)  # the sub-nets do differ


def test_weights_no_subnet_ever_used_keep_their_initial_value(fit_run):
    """Rules 1 and 3: the shared weights are never zeroed or decayed where no sub-net is
    active: a weight outside every mask at every step ends the run bit-identical to its
    initialization (and nonzero)."""
    trainer = fit_run["trainer"]
    never = None
    for state in [*fit_run["before"], fit_run["after"][-1]]:
        used = [torch.stack([state["masks"][k][i] for k in range(N)]).any(0) for i in range(4)]
        never = (
            [~u for u in used]
            if never is None
            else [a & ~u for a, u in zip(never, used, strict=True)]
        )
    count = 0
    for name, w, off in zip(SPARSE, trainer.model.sparse_weights(), never, strict=True):
        assert torch.equal(w.detach()[off], fit_run["initial"][name][off]), name
        assert bool((w.detach()[off] != 0).all()), name
        count += int(off.sum())
    assert count > 100


# --------------------------------------------------------------------------- step by step


def stepped(trainer, steps: int, *, gc: bool):
    """Run ``steps`` training steps; for each yield what the trainer did (snapshots before
    the step, right after the optimizer step, after the step) next to the reference: the
    dense gradient of this step's forward and the direction GC should hand the optimizer."""
    batches = iter(trainer.loaders.train)
    prev = prev_raw = None
    for _ in range(steps):
        t = trainer.step
        k = t % N
        x, y = next(batches)
        before = snapshot(trainer)
        post: list[dict] = []
        hook = trainer.optimizer.register_step_post_hook(
            lambda *_, post=post: post.append(snapshot(trainer))
        )
        trainer.train_step(x, y)
        trainer.step += 1
        hook.remove()
        assert len(post) == 1, "one optimizer step per training step"
        _, grads, _ = ref_forward(before, k, x, y)
        masks = before["masks"][k]
        g = [grads[n] * m for n, m in zip(SPARSE, masks, strict=True)]
        corrected, dot = ref_gc(g, prev, masks, t % N == 0)
        direction = corrected if gc else g
        yield {
            "t": t,
            "k": k,
            "before": before,
            "post": post[0],
            "after": snapshot(trainer),
            "grads": grads,
            "g": g,
            "direction": direction,
            "dot": dot,
            "prev": prev,
            "prev_raw": prev_raw,
        }
        prev, prev_raw = direction, g


def flat(ts) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in ts])


@pytest.mark.parametrize("variant", ["ast_gc", "ast"])
def test_applied_update_is_the_gc_projection(tmp_path, variant):
    """Rules 9 and 10 (AST vs AST+GC). With plain SGD the applied update of the sparse
    weights is lr·(direction); the direction is computed here in float64: g = dense
    gradient ⊙ m_k; at the first step of an inner group g itself; later, with ĝ = g_prev ⊙
    m_k, g − (g·ĝ/‖ĝ‖²)ĝ when g·ĝ < 0; g_prev is the direction applied at the previous
    step. Without GC (ast=ast) the update is g, and the conflicts are still counted."""
    extra = ["optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.5"]
    if variant == "ast":
        extra += ["ast=ast", "ast.count_conflicts=true"]
    trainer = make_trainer(tmp_path, *extra)
    gc = variant == "ast_gc"
    tol = 1e-5  # measured: ~5e-7 (fp32 weights, lr ~0.25)
    conflicts = checked = 0
    telling = {"projection": 0, "group_start": 0, "prev_after_projection": 0}
    for s in stepped(trainer, 30, gc=gc):
        t, k = s["t"], s["k"]
        lr = lr_at(t, peak=0.5)
        w0 = flat(s["before"]["params"][f"net.{n}.weight"] for n in SPARSE)
        w1 = flat(s["post"]["params"][f"net.{n}.weight"] for n in SPARSE)
        applied = (w0 - w1) / lr
        want, g = flat(s["direction"]), flat(s["g"])
        assert close(applied, want, tol), f"step {t}: update != lr x GC direction"
        projected_away = float((want - g).norm()) / float(want.norm())
        if s["dot"] is not None:
            checked += 1
            conflicts += s["dot"] < 0
            telling["projection"] += projected_away > 10 * tol
        if not gc:
            assert projected_away == 0
            continue
        prev = s["prev"]
        if prev is not None and t % N == 0:  # would a (wrong) correction change the update?
            alt, dot = ref_gc(s["g"], prev, s["before"]["masks"][k], False)
            telling["group_start"] += dot < 0 and not close(flat(alt), want, 10 * tol)
        if s["dot"] is not None:  # would g_prev kept before the projection change it?
            alt, _ = ref_gc(s["g"], s["prev_raw"], s["before"]["masks"][k], False)
            telling["prev_after_projection"] += not close(flat(alt), want, 10 * tol)
    summary = trainer.summary([])
    assert int(summary["gc_checked"]) == checked == 20
    assert int(summary["gc_conflicts"]) == conflicts > 0
    if gc:  # the run holds steps where each way of getting GC wrong changes the update
        assert all(v > 0 for v in telling.values()), telling


@pytest.mark.parametrize("nesterov", [True, False])
def test_masked_sgd_step_matches_the_reference_and_leaves_the_rest_bit_identical(
    tmp_path, nesterov
):
    """Rules 3 and 4: every parameter and momentum buffer after the optimizer step equals
    masked SGD written out here (momentum, nesterov or not, weight decay on conv/linear
    weights only), for sub-net k's weights and BatchNorm row k; everything else, momentum
    included, is bit-identical. Update steps included."""
    trainer = make_trainer(
        tmp_path, "ast=ast", f"optim.nesterov={str(nesterov).lower()}", "optim.weight_decay=1e-3"
    )
    updates = 0
    for s in stepped(trainer, 20, gc=False):
        t, k, before, post = s["t"], s["k"], s["before"], s["post"]
        dirs = dict(zip(SPARSE, s["direction"], strict=True))
        want_p, want_m = ref_sgd(
            before, k, s["grads"], dirs, lr=lr_at(t), momentum=0.9, wd=1e-3, nesterov=nesterov
        )
        updates += t in expected_update_steps(k)
        masks = dict(zip(SPARSE, before["masks"][k], strict=True))
        for name, w0 in before["params"].items():
            layer = name[len("net.") :].rsplit(".", 1)[0]
            w1, m1, m0 = post["params"][name], post["moms"][name], before["moms"][name]
            if layer in BNS:
                keep = torch.ones(N, dtype=torch.bool)
                keep[k] = False
            elif layer in masks and name.endswith("weight"):
                keep = ~masks[layer]
            else:
                keep = torch.zeros_like(w0, dtype=torch.bool)
            assert torch.equal(w1[keep], w0[keep]), f"step {t}: {name} moved off sub-net {k}"
            if m0 is not None:
                assert torch.equal(m1[keep], m0[keep]), f"step {t}: {name} momentum moved"
            assert close(w1 - w0, want_p[name] - w0, 1e-4), f"step {t}: {name} update"
            assert close(m1, want_m[name], 1e-5), f"step {t}: {name} momentum"
    assert updates >= 3


def drop_regrow_reference(w, pruned, g, fraction):
    """Per layer (rule 7b): drop ⌈r·nnz⌉ active weights of smallest |w|, regrow as many
    positions, among those not kept, of largest |dense gradient|. Returns (kept, grown)."""
    out = []
    for wl, ml, gl in zip(w, pruned, g, strict=True):
        live = int(ml.sum())
        n_drop = math.ceil(fraction * live)
        kept = top_set(wl.abs().masked_fill(~ml, -math.inf), live - n_drop)
        grown = top_set(gl.abs().masked_fill(kept, -math.inf), n_drop)
        out.append((kept, grown))
    return out


def prune_reference(w, masks, keep):
    """Rule 7a: keep the ``keep`` active weights of largest |w| over all sparse layers."""
    if keep >= nnz(masks):
        return [m.clone() for m in masks]
    scores = torch.cat(
        [wl.abs().masked_fill(~ml, -math.inf).reshape(-1) for wl, ml in zip(w, masks, strict=True)]
    )
    chosen, out, i = top_set(scores, keep), [], 0
    for ml in masks:
        out.append(chosen[i : i + ml.numel()].view_as(ml))
        i += ml.numel()
    return out


def assert_top_by_gradient(grown, kept, g, layer):
    """``grown`` holds the largest |g| among positions outside ``kept``; equal scores at the
    threshold may go either way (the reference gradient is recomputed here)."""
    score = g.abs().double().masked_fill(kept, -math.inf)
    assert not bool((grown & kept).any()), layer
    lowest_in = float(score[grown].min())
    highest_out = float(score[~grown & ~kept].max())
    assert lowest_in >= highest_out * (1 - 1e-6), f"{layer}: regrowth not by |dense gradient|"


def test_update_step_prunes_drops_regrows_in_order_and_keeps_shared_weights(tmp_path):
    """Rules 1, 3, 5, 6, 7 on the trainer's real update steps (AST+GC, momentum, decay).

    From the weights right after the optimizer step: global magnitude pruning to
    round((1 - s(t))·total), then per layer drop ⌈r(t)·nnz⌉ smallest |w| and regrow as many
    largest |dense gradient| (the gradient of this step's forward, ∂L/∂(w ⊙ m_k), from the
    reference). Installing the masks changes no weight and no momentum except the newly
    grown ones no other sub-net uses (zero, zero momentum): weights dropped from k but live
    in another sub-net, and dropped ones live nowhere, are bit-identical."""
    trainer = make_trainer(tmp_path)
    total = sum(w.numel() for w in trainer.model.sparse_weights())
    seen = {"updates": 0, "dropped_live_elsewhere": 0, "dropped_dead": 0, "fresh": 0}
    seen["grown_live_elsewhere"] = 0
    for s in stepped(trainer, 30, gc=True):
        t, k = s["t"], s["k"]
        if t not in expected_update_steps(k):
            continue
        seen["updates"] += 1
        old, new = s["before"]["masks"][k], s["after"]["masks"][k]
        w = [s["post"]["params"][f"net.{n}.weight"] for n in SPARSE]
        keep = round((1 - sparsity_at(k, t)) * total)
        assert nnz(new) == keep, f"step {t}: {nnz(new)} live weights, the ramp says {keep}"
        pruned = prune_reference(w, old, keep)
        dense = [s["grads"][n] for n in SPARSE]
        for name, nl, (kept, grown_ref), gl in zip(
            SPARSE,
            new,
            drop_regrow_reference(w, pruned, dense, regrow_fraction_at(t)),
            dense,
            strict=True,
        ):
            assert bool((kept <= nl).all()), f"step {t} {name}: prune/drop kept the wrong weights"
            grown = nl & ~kept
            assert int(grown.sum()) == int(grown_ref.sum()), f"step {t} {name}: regrow count"
            assert_top_by_gradient(grown, kept, gl, name)
        others = [s["after"]["masks"][j] for j in range(N) if j != k]
        for i, name in enumerate(SPARSE):
            key = f"net.{name}.weight"
            elsewhere = torch.stack([o[i] for o in others]).any(0)
            fresh = new[i] & ~old[i] & ~elsewhere
            stay = ~fresh
            post, after = s["post"], s["after"]
            assert torch.equal(after["params"][key][stay], post["params"][key][stay]), name
            assert torch.equal(after["moms"][key][stay], post["moms"][key][stay]), name
            assert bool((after["params"][key][fresh] == 0).all()), f"{name}: fresh weight != 0"
            assert bool((after["moms"][key][fresh] == 0).all()), f"{name}: fresh momentum != 0"
            dropped = old[i] & ~new[i]
            seen["dropped_live_elsewhere"] += int((dropped & elsewhere).sum())
            seen["dropped_dead"] += int((dropped & ~elsewhere).sum())
            seen["fresh"] += int((post["params"][key][fresh] != 0).sum())
            seen["grown_live_elsewhere"] += int((new[i] & ~old[i] & elsewhere).sum())
    assert seen["updates"] == 7 and all(v > 0 for v in seen.values()), seen


def test_prune_then_drop_then_regrow_on_a_hand_built_state(tmp_path):
    """Rule 7's order on a state built so that any other order gives other masks: every
    |w| and |g| distinct, sub-net 0 with a random 80 % of the weights live, at step 12 (its
    second update, in the ramp). The trainer's updater must give prune → drop → regrow as
    computed here; the test first checks that the swapped orders differ from it."""
    trainer = make_trainer(tmp_path)
    model, t, k = trainer.model, 12, 0
    assert t in expected_update_steps(k)
    gen = torch.Generator().manual_seed(7)
    weights = model.sparse_weights()
    total = sum(w.numel() for w in weights)
    mags = (torch.randperm(total, generator=gen).double() + 1) / total  # distinct |w|
    signs = torch.randint(0, 2, (total,), generator=gen) * 2 - 1
    grads_flat = (torch.randperm(total, generator=gen).float() + 1) * (-1) ** torch.arange(total)
    masks, w, g, i = [], [], [], 0
    for p in weights:
        n = p.numel()
        with torch.no_grad():
            p.copy_((mags[i : i + n] * signs[i : i + n]).view_as(p))
        w.append(p.detach().clone())
        g.append(grads_flat[i : i + n].view_as(p).clone())
        masks.append(torch.rand(p.shape, generator=gen) < 0.8)
        i += n
    model.set_masks(k, masks)
    keep = round((1 - sparsity_at(k, t)) * total)
    r = regrow_fraction_at(t)
    assert keep < nnz(masks)  # pruning has work to do

    def order_prune_drop_regrow():
        pruned = prune_reference(w, masks, keep)
        return [a | b for a, b in drop_regrow_reference(w, pruned, g, r)]

    def order_drop_regrow_prune():
        regrown = [a | b for a, b in drop_regrow_reference(w, masks, g, r)]
        return prune_reference(w, regrown, keep)

    def order_regrow_before_drop():  # regrowth ranks positions before this update's drop
        pruned = prune_reference(w, masks, keep)
        out = []
        for wl, ml, gl in zip(w, pruned, g, strict=True):
            n_drop = math.ceil(r * int(ml.sum()))
            grown = top_set(gl.abs().masked_fill(ml, -math.inf), n_drop)
            kept = top_set(wl.abs().masked_fill(~ml, -math.inf), int(ml.sum()) - n_drop)
            out.append(kept | grown)
        return out

    want = order_prune_drop_regrow()
    assert nnz(want) == keep
    for other in (order_drop_regrow_prune(), order_regrow_before_drop()):
        assert any(not torch.equal(a, b) for a, b in zip(want, other, strict=True))
    got = trainer.updater.decide(k, t, g)
    for name, a, b in zip(SPARSE, got, want, strict=True):
        assert torch.equal(a, b), f"{name}: not prune -> drop -> regrow"


NM_PATTERNS = {0: (2, 4), 1: (1, 4), 2: (1, 8)}
NM_T1 = 23  # ramp_end_epoch=0.5 of 46 steps


def nm_groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Live weights per group of m consecutive input channels, for each output position
    (conv [O, I, kh, kw] → [O, kh, kw, I/m, m]; linear [O, I] → [O, I/m, m])."""
    assert mask.shape[1] % m == 0
    t = mask.permute(0, 2, 3, 1) if mask.ndim == 4 else mask
    return t.reshape(-1, m).sum(1)


def test_nm_group_fraction_follows_the_cubic_ramp(tmp_path):
    """Rule 10 (N:M): at each update of sub-net k at step t, in every sparse layer the
    number of groups holding at most N live weights is round(f(t)·groups), f(t) = 1 − (1 −
    t/t1)³ written out here; the other groups are dense; from t1 on every group is N:M."""
    cfg = compose_config(
        [
            "experiment=r18_cifar_nm",
            "data=digits",
            "model=tiny_cnn",
            f"model.width={WIDTH}",
            f"data.image_size={IMAGE}",
            f"run_dir={tmp_path}",
            "train.max_steps=30",
            f"train.batch_size={BATCH}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.final_eval=false",
            "train.log_every=1",
            "checkpoint.every_steps=0",
            "ast.ramp_end_epoch=0.5",
            "ast.update_every=6",
            "ast.stagger=2",
        ]
    )
    trainer = build_trainer(cfg, CPU)
    model = trainer.model
    masks_at: list = []
    handle = model.register_forward_pre_hook(
        lambda mod, args: (
            masks_at.append([[m.clone() for m in model.masks(k)] for k in range(N)])
            if mod.training
            else None
        )
    )
    trainer.fit()
    handle.remove()
    masks_at.append([[m.clone() for m in model.masks(k)] for k in range(N)])
    updates = {}
    for r in (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()):
        for k in r.get("mask_update") or []:
            updates.setdefault(k, []).append(r["step"] - 1)
    assert updates == {0: [0, 6, 12, 18, 24], 1: [4, 10, 16, 22, 28], 2: [5, 11, 17, 23, 29]}
    checked_mid = 0
    for k, steps in updates.items():
        n, m = NM_PATTERNS[k]
        for t in steps:
            f = 1.0 if t >= NM_T1 else 1 - (1 - t / NM_T1) ** 3
            checked_mid += 0.2 < f < 0.8
            for name, mask in zip(SPARSE, masks_at[t + 1][k], strict=True):
                live = nm_groups(mask, m)
                sparse = live <= n
                assert int(sparse.sum()) == round(f * live.numel()), (k, t, name)
                assert bool((live[~sparse] == m).all()), (k, t, name)  # the rest dense
                assert bool((live[sparse] == n).all()), (k, t, name)
    assert checked_mid >= 3
