"""N:M structured sub-nets (DESIGN §1.10): groups of M consecutive input channels, the
fraction of N:M groups ramped to 100%, group-wise prune-and-regrow, and every group of
every sparse layer in its pattern after a real (short) training run."""

from __future__ import annotations

import json

import pytest
import torch

from dist_ast.cli import compose_config
from dist_ast.config import ConfigError
from dist_ast.models import build_subnet_model
from dist_ast.sparsity import nm
from dist_ast.sparsity.schedule import SparsitySchedule
from dist_ast.sparsity.updater import MaskUpdater


@pytest.mark.parametrize("shape", [(4, 10, 3, 3), (6, 12, 1, 1), (5, 10), (3, 16)])
def test_groups_are_consecutive_input_channels_and_round_trip(shape):
    m = 4
    t = torch.randn(shape)
    assert torch.equal(nm.from_groups(nm.to_groups(t, m), shape), t)
    # Each group holds input channels c..c+3 of one (output, kh, kw) position.
    channel = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2))).expand(shape)
    g = nm.to_groups(channel.float(), m, fill=-1)
    for row in g:
        real = row[row >= 0]
        assert real[0] % m == 0 and torch.equal(real, real[0] + torch.arange(len(real)))


def test_full_fraction_gives_the_pattern_with_largest_weights():
    torch.manual_seed(0)
    w = torch.randn(8, 10, 3, 3)  # 10 input channels: groups of 4, 4 and a short one of 2
    mask = torch.ones_like(w, dtype=torch.bool)
    for pattern in ("2:4", "1:4", "3:8", "1:8"):
        n, m = nm.parse_pattern(pattern)
        new = nm.nm_update(w, mask, None, pattern, fraction=1.0, regrow_fraction=0.0)
        assert nm.satisfies(new, pattern)
        counts = nm.group_counts(new, m)
        size = nm.group_counts(torch.ones_like(mask), m)
        assert torch.equal(counts, torch.minimum(size, torch.full_like(size, n)))
        # The live weights of a group are its n largest |w|.
        gw, gm = nm.to_groups(w.abs(), m), nm.to_groups(new, m, fill=False)
        for row_w, row_m, s in zip(gw, gm, size, strict=True):
            if s > n:
                assert row_w[row_m].min() >= row_w[:s][~row_m[:s]].max()


def test_fraction_ramp_and_groupwise_prune_and_regrow():
    torch.manual_seed(1)
    w = torch.randn(16, 8)  # linear: 16 rows x 2 groups of 4 = 32 groups
    mask = torch.ones_like(w, dtype=torch.bool)
    m1 = nm.nm_update(w, mask, None, "2:4", fraction=0.25, regrow_fraction=0.0)
    assert nm.nm_fraction(m1, "2:4") == 8 / 32
    # Pruned first: the dense groups of smallest summed |w|.
    group_w = nm.to_groups(w.abs(), 4).sum(1)
    sparse = nm.group_counts(m1, 4) <= 2
    assert group_w[sparse].max() <= group_w[~sparse].min()

    # Regrow: 2 of the 8 N:M groups (ceil(0.25 * 8)) with the largest summed |gradient|
    # turn dense; as many dense groups of smallest summed |w| become N:M.
    grad = torch.zeros_like(w)
    grad_groups = nm.to_groups(grad, 4)
    chosen = sparse.nonzero().flatten()[[1, 5]]
    grad_groups[chosen] = 10.0
    grad = nm.from_groups(grad_groups, w.shape)
    m2 = nm.nm_update(w, m1, grad, "2:4", fraction=0.25, regrow_fraction=0.25)
    sparse2 = nm.group_counts(m2, 4) <= 2
    assert int(sparse2.sum()) == 8  # the scheduled fraction holds
    assert not sparse2[chosen].any()  # the high-gradient groups grew back
    newly = sparse2 & ~sparse
    dense_before = ~sparse
    assert int(newly.sum()) == 2
    assert group_w[newly].max() <= group_w[dense_before & ~newly].min()

    m3 = nm.nm_update(w, m2, grad, "2:4", fraction=1.0, regrow_fraction=0.25)
    assert nm.nm_fraction(m3, "2:4") == 1.0 and nm.satisfies(m3, "2:4")


def test_updater_checks_the_config():
    model = build_subnet_model(compose_config(["model=tiny_cnn"]).model, 2)
    schedule = SparsitySchedule(
        sparsities=(0.5, 0.8),
        initial_sparsity=0.0,
        total_steps=100,
        ramp_start=0,
        ramp_end=50,
        update_every=10,
        stagger=2,
        update_end=100,
    )
    with pytest.raises(ConfigError, match=r"ast.sparsities=\[0.5, 0.75\]"):
        MaskUpdater(model, schedule, nm_patterns=["2:4", "1:4"])
    up = MaskUpdater(model, schedule, nm_patterns=["2:4", "1:5"])
    assert up.nm_fraction(0) == 0.0 and up.nm_fraction(50) == 1.0
    assert 0.0 < up.nm_fraction(10) < up.nm_fraction(30) < 1.0


def test_r18_cifar_nm_experiment_composes():
    cfg = compose_config(["experiment=r18_cifar_nm"])
    assert cfg.model.name == "resnet18" and cfg.ast.nm_patterns == ["2:4", "1:4", "1:8"]
    assert cfg.ast.sparsities == [0.5, 0.75, 0.875]


@pytest.mark.slow
def test_every_group_in_pattern_after_a_short_training_run(tmp_path):
    from dist_ast.subnets_io import load_subnet_model
    from dist_ast.train import run

    overrides = [
        "experiment=r18_cifar_nm",
        "data=digits",
        "model=tiny_cnn",  # ResNet-18 takes minutes on a CPU; the N:M logic is the same
        f"run_dir={tmp_path}",
        "train.max_steps=24",
        "train.batch_size=16",
        "train.progress=false",
        "train.log_every=1",
        "ast.ramp_end_epoch=0.1",  # ramp over 9 steps
        "ast.update_every=9",
        "ast.stagger=3",
        "checkpoint.every_steps=0",
    ]
    summary = run(compose_config(overrides))
    config, model = load_subnet_model(tmp_path)
    for k, pattern in enumerate(config.ast.nm_patterns):
        for name, mask in zip(model.sparse_names, model.masks(k), strict=True):
            assert nm.satisfies(mask, pattern), (k, name)
            assert nm.nm_fraction(mask, pattern) == 1.0
        assert summary["subnets"][k]["sparsity"] == pytest.approx(
            nm.pattern_sparsity(pattern), abs=1e-9
        )
    # The fraction of N:M groups rose over the ramp (sparsity at each logged step).
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    s2 = [r["sparsity"][2] for r in records if "sparsity" in r]
    assert s2[0] < 0.875 and s2 == sorted(s2) and s2[-1] == pytest.approx(0.875)


def test_sparse24_bench_prepares_24_weights_and_skips_without_gpu():
    from benchmarks import harness, sparse24

    w = torch.randn(64, 128)
    w24 = sparse24.to_24(w)
    assert nm.satisfies(w24 != 0, "2:4") and int((w24 != 0).sum()) == w.numel() // 2
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench itself runs (python -m benchmarks sparse24)")
    rows = sparse24.run(harness.parse_args(sparse24, ["--batch", "8"]))
    assert len(rows) == 1 and "no CUDA GPU" in rows[0]["skipped"]
