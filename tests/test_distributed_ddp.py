"""Distributed AST on 2 gloo processes (torch.multiprocessing spawn) vs one process.

Exactness argument for the equivalence test: with a model whose normalization does not
depend on the batch split (GroupNorm), 2 ranks × batch B and 1 rank × batch 2B compute
the same mean gradient up to the order of floating-point summation (two half-batch
means averaged vs one mean) and GC's partial dot products. In float64 that is ~1e-16
relative per step; over K steps it stays far below the 1e-9 we allow on weights, and
mask decisions (top-k on |w| and |grad| over a few thousand weights) are identical.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_ast.config import EngineConfig
from dist_ast.distributed.setup import DistInfo, leave_together
from dist_ast.sparsity.model import convert_to_subnets
from tests.dist_utils import (
    B,
    SmallNet,
    _train_part,
    assert_same_run,
    build,
    global_batch,
    init,
    make_config,
    mask_agreement,
    reference,
    relative_distance,
    spawn,
    train,
)

pytestmark = pytest.mark.distributed


def _all_worker(rank, world, port, out: str) -> None:
    """Every 2-rank scenario of this file in one launch (process start-up dominates)."""

    info = init(rank, world, port)
    with leave_together():
        _train_part(rank, world, info, out, "ddp", [0], "group", "float64")
        _train_part(rank, world, info, out, "ddp", [0], "batch", "float64")
        _bn_first_step_part(rank, world, info, out)
        _hook_part(rank, world, info, out)
        _hook_part(rank, world, info, out, channels_last=True)
        _eval_part(rank, world, info, out)
        _corrupt_part(rank, world, info, out)  # last: it leaves the ranks' masks different


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_runs")
    spawn(_all_worker, str(out), timeout=480)
    return out


def test_two_ranks_equal_one_rank_exact_groupnorm(runs: Path, tmp_path: Path) -> None:
    """engine=ddp: 2 ranks × B == 1 rank × 2B through mask updates and GC (float64)."""
    ref = reference("group", torch.float64, tmp_path)
    assert len(ref["mask_updates"]) >= 6 and ref["gc_conflicts"] >= 2  # the test exercises both
    r0 = torch.load(runs / "ddpgroup0_rank0.pt")
    r1 = torch.load(runs / "ddpgroup0_rank1.pt")
    assert_same_run(r0, ref, atol=1e-9)
    # Ranks agree exactly with each other: masks, GC counts, weights.
    assert_same_run(r1, r0, atol=0.0)
    assert r0["gc_conflicts"] == r1["gc_conflicts"] == ref["gc_conflicts"]
    # The hook sent only m_k (+ non-sparse entries) on ordinary steps, dense on updates.
    dense = sum(p.numel() for p in r0["params"].values()) * 8
    update_steps = {u["step"] for u in ref["mask_updates"]}
    compact_steps = 0
    for step, nbytes in enumerate(r0["comm_bytes"]):
        if step in update_steps:
            assert nbytes == dense  # prune-and-regrow needs the dense gradient
        else:  # exactly the active sub-net's live weights + the non-sparse parameters
            assert nbytes == r0["compact_bytes"][step]
            compact_steps += nbytes < dense
    assert compact_steps >= 3


def test_two_ranks_batchnorm_statistical(runs: Path, tmp_path: Path) -> None:
    """With BatchNorm each rank normalizes its half batch, so the runs differ; they must
    stay statistically close, and BN statistics are identical on every rank."""
    ref = reference("batch", torch.float64, tmp_path)
    r0 = torch.load(runs / "ddpbatch0_rank0.pt")
    r1 = torch.load(runs / "ddpbatch0_rank1.pt")
    # Averaged after every step: identical running statistics on both ranks.
    for name, b in r0["buffers"].items():
        assert torch.equal(b, r1["buffers"][name]), name
    assert_same_run(r1, r0, atol=0.0)
    # Statistically close to the single-process run: the split of the batch moves the
    # run much less than drawing other batches does (same init, same schedule).
    other = reference("batch", torch.float64, tmp_path, seed=5000)
    split, noise = relative_distance(r0, ref), relative_distance(other, ref)
    assert split < 0.5 * noise, f"batch split moved weights by {split:.3f}, other data {noise:.3f}"
    assert mask_agreement(r0, ref) > mask_agreement(other, ref)


def _bn_first_step_part(rank, world, info, out: str) -> None:
    trainer = build(make_config("ddp"), info, "batch", torch.float64, Path(out))
    state = train(trainer, rank, world, torch.float64, steps=1)
    torch.save(state, Path(out) / f"bn1_rank{rank}.pt")


def test_bn_running_mean_after_one_step_equals_global_batch(runs: Path, tmp_path: Path) -> None:
    """Our BN choice: per-rank statistics averaged after each step. At step 1 (identical
    weights) the averaged running mean is exactly the global batch's."""
    config = make_config("ddp")
    single = build(config, DistInfo(0, 1, 0, torch.device("cpu")), "batch", torch.float64, tmp_path)
    ref = train(single, 0, 1, torch.float64, steps=1)
    got = torch.load(runs / "bn1_rank0.pt")
    # The first BatchNorm sees identical inputs (conv1 of the same weights): exact. Deeper
    # ones see inputs normalized with per-rank statistics: close, not equal.
    first = "net.n1.running_mean"
    torch.testing.assert_close(got["buffers"][first], ref["buffers"][first], rtol=0, atol=1e-12)
    for n in [n for n in ref["buffers"] if n.endswith("running_mean") and n != first]:
        torch.testing.assert_close(got["buffers"][n], ref["buffers"][n], rtol=0.1, atol=1e-3)


def _hook_part(rank, world, info, out: str, channels_last: bool = False) -> None:
    """Real DDP + hook vs a dense all-reduce of the same local gradients, then masking.

    With ``channels_last`` DDP lays the conv gradients out NHWC in its buckets: the hook
    must pick the entries of m_k in that order, not in the logical one."""
    import torch.distributed as dist

    from dist_ast.distributed.ddp import wrap_model

    torch.manual_seed(0)
    model = convert_to_subnets(SmallNet("group"), 2, ["conv1"]).double()
    g = torch.Generator().manual_seed(5)
    from dist_ast.sparsity.masks import random_mask

    for k, density in enumerate([0.3, 0.1]):
        model.set_masks(
            k,
            [random_mask(w.shape, int(density * w.numel()), g) for w in model.sparse_weights()],
        )
    if channels_last:
        model.to_channels_last()
        assert model.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    engine = EngineConfig(compact_max_density=1.0, bucket_cap_mb=0.01)  # several buckets
    ddp, sync = wrap_model(model, info, engine)
    twin = convert_to_subnets(SmallNet("group"), 2, ["conv1"]).double()
    twin.load_state_dict(model.state_dict())
    if channels_last:  # the same conv kernels on both sides: equal up to the last bit
        twin.to_channels_last()
    results = {}
    for it in range(3):  # iteration 0 uses DDP's initial buckets, later ones the rebuilt
        k = it % 2
        x, y = global_batch(it, torch.float64)
        x, y = x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for m in (model, twin):
            m.set_subnet(k)
            m.zero_grad(set_to_none=True)
        sync.begin_step([])
        nn.functional.cross_entropy(ddp(x), y).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
        expect = {}
        sparse = {id(w): m for w, m in zip(twin.sparse_weights(), twin.masks(k), strict=True)}
        for (name, p), q in zip(twin.named_parameters(), model.parameters(), strict=True):
            g_ = p.grad.clone()
            dist.all_reduce(g_)
            g_ /= world
            got = q.grad
            if id(p) in sparse:  # the trainer's masking step removes the rest
                g_, got = g_ * sparse[id(p)], got * sparse[id(p)]
            expect[name] = g_
            assert torch.equal(got, g_), f"iteration {it}: {name} differs"
        active = sum(int(m.sum()) for m in model.masks(k))
        other = sum(p.numel() for p in model.parameters()) - sum(
            w.numel() for w in model.sparse_weights()
        )
        results[it] = (sync.step_bytes, (active + other) * 8)
    torch.save(results, Path(out) / f"hook{'_cl' if channels_last else ''}_rank{rank}.pt")


@pytest.mark.parametrize("layout", ["", "_cl"], ids=["contiguous", "channels_last"])
def test_hook_equals_dense_allreduce_then_mask_and_counts_bytes(runs: Path, layout: str) -> None:
    # The gradients themselves are compared bit for bit inside the workers (_hook_part).
    for rank in range(2):
        for it, (sent, expected) in torch.load(runs / f"hook{layout}_rank{rank}.pt").items():
            assert sent == expected, f"rank {rank} iteration {it}: {sent} bytes != {expected}"


def _corrupt_part(rank, world, info, out: str) -> None:
    try:
        trainer = build(make_config("ddp"), info, "group", torch.float64, Path(out))
        train(trainer, rank, world, torch.float64, steps=1)
        if rank == 1:  # flip one bit of sub-net 2's mask of the third sparse layer
            trainer.model.masks(2)[2].view(-1)[7] ^= True
        try:
            train(trainer, rank, world, torch.float64, steps=4)
        except RuntimeError as e:
            (Path(out) / f"error_rank{rank}.txt").write_text(f"{trainer.step}\n{e}")
        else:
            (Path(out) / f"error_rank{rank}.txt").write_text("no error")
    except Exception:
        (Path(out) / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise


def test_corrupted_mask_is_detected_with_layer_name(runs: Path) -> None:
    from dist_ast.sparsity.model import convert_to_subnets as conv

    layer = conv(SmallNet("group"), 3, ["conv1"]).sparse_names[2]
    for rank in range(2):
        text = (runs / f"error_rank{rank}.txt").read_text()
        step, _, msg = text.partition("\n")
        assert step == "1", text  # stopped at the next mask update (sub-net 1's, step 1)
        assert "mask mismatch" in msg and repr(layer) in msg and "sub-net 2" in msg, msg


def _eval_part(rank, world, info, out: str) -> None:
    from dist_ast.data.memory import TensorLoader
    from dist_ast.evaluate import evaluate_subnets

    model, images, labels = eval_setup()
    val = TensorLoader(
        images,
        labels,
        batch_size=16,
        rank=rank,
        world_size=world,
        shuffle=False,
        drop_last=False,
    )
    torch.save(evaluate_subnets(model, val, info), Path(out) / f"eval_rank{rank}.pt")


def eval_setup():
    torch.manual_seed(3)
    model = convert_to_subnets(SmallNet("batch"), 3, ["conv1"])
    g = torch.Generator().manual_seed(4)
    from dist_ast.sparsity.masks import random_mask

    for k, d in enumerate([0.5, 0.3, 0.2]):
        model.set_masks(
            k, [random_mask(w.shape, int(d * w.numel()), g) for w in model.sparse_weights()]
        )
    images = torch.randn(203, 3, 8, 8, generator=g)  # not a multiple of 2 × 16
    labels = torch.randint(0, 10, (203,), generator=g)
    return model, images, labels


def test_parallel_evaluation_equals_single_process(runs: Path) -> None:
    from dist_ast.data.memory import TensorLoader
    from dist_ast.evaluate import evaluate_subnets

    model, images, labels = eval_setup()
    val = TensorLoader(images, labels, batch_size=16, shuffle=False, drop_last=False)
    single = evaluate_subnets(model, val, DistInfo(0, 1, 0, torch.device("cpu")))
    assert all(r["samples"] == 203 for r in single)
    for rank in range(2):
        assert torch.load(runs / f"eval_rank{rank}.pt") == single
