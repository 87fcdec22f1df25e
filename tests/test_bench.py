"""The benchmark harness: statistics, interleaved timing, tables, BENCHMARKS.md sections,
dispatch to a benchmark module, and the ablation's aggregation. No timing assertions."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import BENCHMARKS, ablation, harness

REPO = Path(__file__).resolve().parent.parent


def test_summarize_matches_numpy_quantiles():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10, 11):
        xs = rng.random(n).tolist()
        s = harness.summarize(xs)
        assert s.n == n
        assert s.median == pytest.approx(float(np.median(xs)))
        assert s.q1 == pytest.approx(float(np.quantile(xs, 0.25)))
        assert s.q3 == pytest.approx(float(np.quantile(xs, 0.75)))
        assert (s.min, s.max) == (min(xs), max(xs))
        assert s.iqr == pytest.approx(s.q3 - s.q1)
    with pytest.raises(ValueError):
        harness.summarize([])


def test_paired_ratios_cancel_drift_that_ratio_of_medians_does_not():
    # the machine slows down 3x over the rounds; B is always exactly 1.1x A
    a = [1.0, 2.0, 3.0, 1.5, 2.5]
    b = [1.1 * x for x in a]
    r = harness.paired_ratios({"a": a, "b": b}, "a")
    assert r["b"].median == pytest.approx(1.1)
    assert r["b"].iqr == pytest.approx(0.0, abs=1e-12)
    assert r["a"].median == 1.0
    with pytest.raises(ValueError):
        harness.paired_ratios({"a": a, "b": b[:3]}, "a")


def test_time_interleaved_rotates_order_warms_up_and_times_each_call():
    calls: list[str] = []
    now = [0.0]
    cost = {"A": 1.0, "B": 2.0, "C": 4.0}

    def make(name):
        def f():
            calls.append(name)
            now[0] += cost[name]

        return f

    out = harness.time_interleaved(
        {n: make(n) for n in cost},
        repeats=3,
        warmup=2,
        inner=2,
        sync=lambda: None,
        clocks={"fake": lambda: now[0]},
    )
    # warm-up: each variant twice, in turn; then rounds rotated A B C / B C A / C A B
    assert calls[:6] == ["A", "A", "B", "B", "C", "C"]
    rounds = calls[6:]
    assert (
        rounds
        == ["A"] * 2
        + ["B"] * 2
        + ["C"] * 2
        + ["B"] * 2
        + ["C"] * 2
        + ["A"] * 2
        + ["C"] * 2
        + ["A"] * 2
        + ["B"] * 2
    )
    assert out["fake"] == {"A": [1.0] * 3, "B": [2.0] * 3, "C": [4.0] * 3}


def test_fmt_value_and_markdown_table():
    assert harness.fmt_value(None) == ""
    assert harness.fmt_value(True) == "yes"
    assert harness.fmt_value(1234567) == "1,234,567"
    assert harness.fmt_value(1.23456) == "1.235"
    assert harness.fmt_value(2.5e9) == "2.500e+09"
    rows = [{"name": "a|b", "x": 1.0}, {"name": "c", "y": 2}]
    md = harness.markdown_table(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| name | x | y |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1 |  |"  # pipes escaped, missing cell empty
    assert lines[3] == "| c |  | 2 |"
    assert harness.markdown_table([]) == "_(no rows)_\n"


def test_append_markdown_writes_header_once_and_dated_sections(tmp_path):
    import datetime as dt

    out = tmp_path / "B.md"
    machine = {"cpu": "TestCPU", "cores": 2, "torch_threads": 1, "torch": "x", "gpu": "none"}
    when = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc)
    for i in range(2):
        sec = harness.markdown_section(
            "step", [{"v": i}], command="python -m benchmarks step", machine=machine, when=when
        )
        harness.append_markdown(out, sec)
    text = out.read_text()
    assert text.count("# Benchmarks") == 1
    assert text.count("## step · 2026-01-02 03:04 UTC") == 2
    assert "Command: `python -m benchmarks step`" in text
    assert "TestCPU (2 cores, 1 torch threads)" in text
    assert "| 0 |" in text and "| 1 |" in text


def test_machine_description_has_the_essentials():
    d = harness.machine_description()
    for key in ("cpu", "cores", "torch", "torch_threads", "gpu"):
        assert key in d and d[key] not in (None, "")


def test_main_dispatches_to_module_and_records(tmp_path, monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("benchmarks.comm")
    fake.TITLE = "fake comm"

    def add_arguments(p):
        p.add_argument("--size", type=int, default=1)

    def run(args):
        seen["size"] = args.size
        return [{"size": args.size, "ratio": 1.01}]

    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "benchmarks.comm", fake)
    out = tmp_path / "BENCH.md"
    assert harness.main(["comm", "--size", "7", "--output", str(out)]) == 0
    assert seen["size"] == 7
    text = out.read_text()
    assert "## fake comm ·" in text
    assert "`python -m benchmarks comm --size 7 --output " in text
    assert "| size | ratio |" in text and "| 7 | 1.01 |" in text
    # --no-record prints only
    assert harness.main(["comm", "--no-record", "--output", str(out)]) == 0
    assert out.read_text() == text


def test_main_reports_missing_benchmark(monkeypatch):
    monkeypatch.setitem(sys.modules, "benchmarks.sparse24", None)  # import fails
    assert harness.main(["sparse24", "--no-record"]) == 2


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_keeps_the_one_parser_contract(name):
    """``add_arguments(parser)`` + ``run(args) -> rows``: every option has a default, so
    ``parse_args(module, [])`` works, and no second parser lives beside it."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.add_arguments) and callable(module.run)
    for other in ("parser", "parse_args", "print_table"):
        assert not hasattr(module, other), f"benchmarks.{name}.{other}: one parser contract"
    assert isinstance(harness.parse_args(module, []), argparse.Namespace)


def test_default_output_is_benchmarks_md_in_the_working_directory(tmp_path, monkeypatch):
    """BENCHMARKS.md is found from where the command runs (the repository root), never
    from the location of the benchmarks' files."""
    assert harness.DEFAULT_OUTPUT == Path("BENCHMARKS.md")
    fake = types.ModuleType("benchmarks.comm")
    fake.add_arguments = lambda p: None
    fake.run = lambda args: [{"x": 1}]
    monkeypatch.setitem(sys.modules, "benchmarks.comm", fake)
    monkeypatch.chdir(tmp_path)
    assert harness.main(["comm"]) == 0
    assert "Command: `python -m benchmarks comm`" in (tmp_path / "BENCHMARKS.md").read_text()


def test_benchmarks_stay_out_of_the_wheel():
    import tomllib
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(REPO), **find["packages"]["find"])
    assert "dist_ast" in found
    assert not [p for p in found if p.startswith(("benchmarks", "tests", "dist_ast.bench"))]


# -- the ablation's bookkeeping ------------------------------------------------------------


def _ablation_args(tmp_path, **kw):
    a = harness.parse_args(ablation, ["--out", str(tmp_path / "abl"), "--seeds", "0", "1"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_ablation_plan_is_seed_major_with_one_individual_run_per_sparsity(tmp_path):
    a = _ablation_args(tmp_path)
    plan = ablation.plan(a)
    labels = [(label, seed) for label, seed, _, _ in plan]
    per_seed = 4 + len(a.sparsities)  # ast_gc, ast, joint, cs + individual runs
    assert len(plan) == 2 * per_seed
    assert all(seed == 0 for _, seed in labels[:per_seed])
    assert {lab for lab, _ in labels} >= {"individual_0.8", "individual_0.95", "joint", "ast_gc"}
    for label, seed, overrides, run_dir in plan:
        assert f"train.seed={seed}" in overrides
        assert overrides[-1] == f"run_dir={run_dir}"
        if label.startswith("individual"):
            assert "ast=individual" in overrides
        # validation curves only for the first seed of the curve methods
        has_curve = any(o.startswith("train.eval_every=") for o in overrides)
        assert has_curve == (label in a.curve_methods and seed == 0)


def _fake_summary(top1s, flops, conflicts=(3, 10)):
    return {
        "train_flops": flops,
        "gc_conflicts": conflicts[0],
        "gc_checked": conflicts[1],
        "steps": 30,
        "subnets": [
            {"index": i, "target_sparsity": s, "sparsity": s, "top1": t}
            for i, (s, t) in enumerate(zip((0.8, 0.9, 0.95), top1s, strict=False))
        ],
    }


def test_ablation_aggregates_mean_std_over_seeds_and_reads_curves(tmp_path):
    a = _ablation_args(tmp_path, curve_methods=["ast_gc"], plot=tmp_path / "ramp.png")
    for seed, tops in ((0, (0.5, 0.4, 0.3)), (1, (0.7, 0.6, 0.5))):
        d = a.out / "ast_gc" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(_fake_summary(tops, 100 + seed)))
    d0 = a.out / "ast_gc" / "seed0"
    (d0 / "config.json").write_text(
        json.dumps({"ast": {"ramp_end_epoch": 2}, "train": {"epochs": 3}})
    )
    recs = [
        {"step": 10, "eval": [{"index": i, "top1": v} for i, v in enumerate((0.3, 0.2, 0.1))]},
        {"step": 20, "eval": [{"index": i, "top1": v} for i, v in enumerate((0.6, 0.05, 0.2))]},
        {"step": 30, "eval": [{"index": i, "top1": v} for i, v in enumerate((0.5, 0.4, 0.3))]},
    ]
    (d0 / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rows = ablation.run(argparse.Namespace(**{**vars(a), "report_only": True}))
    assert [r["method"] for r in rows] == ["ast_gc"] * 3
    assert rows[0]["top-1 %"] == "60.00 ± 14.14"  # mean and sample std of 50 and 70
    assert rows[0]["seeds"] == 2
    assert rows[0]["train FLOPs (run)"] == pytest.approx(100.5)
    assert rows[0]["GC conflicts"] == "3/10"
    checks = {c["sub-net"]: c for c in ablation.last_checks}
    assert checks[1]["largest drop from an earlier best (points)"] == pytest.approx(15.0)
    assert checks[0]["largest drop from an earlier best (points)"] == pytest.approx(10.0)
    assert (tmp_path / "ramp.png").stat().st_size > 0
    assert "15.0 points" in ablation.last_notes()


# -- every benchmark through its command line, one tiny round ------------------------------


# name -> (options for one small round on a toy setting, strings its table must contain)
TINY = {
    "step": (
        ["--presets", "r18_32", "--batch-size", "2", "--sparsities", "0.8", "0.9"]
        + ["--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"],
        ["| dense |", "| ast |", "| ast_gc |", "| joint |"],
    ),
    "prune": (
        ["--model", "resnet20", "--image-size", "32", "--batch-size", "2"]
        + ["--sparsities", "0.8", "0.9", "--repeats", "1", "--warmup", "0", "--threads", "1"],
        ["decide (sub-net 1", "broadcast bit-packed masks", "checksum check"],
    ),
    "memory": (
        ["--model", "resnet20", "--max-subnets", "2", "--image-size", "32", "--batch-size", "2"]
        + ["--device", "cpu"],
        ["| resnet20 | dense |", "| resnet20 | 1 |", "| resnet20 | 2 |"],
    ),
    "comm": (["--model", "resnet20", "--densities", "0.1", "--repeats", "1"], ["| 0.1 |"]),
    "data": (
        ["--images", "16", "--batch-size", "8", "--image-size", "32", "--workers", "0"]
        + ["--rounds", "1", "--cache", "{tmp}/data"],
        ["torchvision ImageFolder", "webdataset + torchvision", "DALI (fused decode+crop)"],
    ),
    "checkpoint": (
        ["--ranks", "1", "2", "--rounds", "1", "--model", "resnet20", "--subnets", "2"]
        + ["--dir", "{tmp}/ckpt"],
        ["| 1 |", "| 2 |"],
    ),
    # without a GPU: one row saying why; with one: the 2:4 kernels at a small batch
    "sparse24": (["--batch", "16"], ["CUDA" if not torch.cuda.is_available() else "| fp16 |"]),
    "ablation": (
        ["--data", "digits", "--model", "tiny_cnn", "--seeds", "0", "--methods", "ast_gc"]
        + ["--epochs", "1", "--ramp-end-epoch", "0.5", "--update-every", "6", "--stagger", "2"]
        + ["--eval-every", "8", "--curve-methods", "ast_gc", "--extra", "model.width=8"]
        + ["--out", "{tmp}/abl", "--plot", "{tmp}/abl.png"],
        ["| ast_gc | 0.8 |", "| ast_gc | 0.95 |"],
    ),
}


def test_tiny_rounds_cover_every_benchmark():
    assert set(TINY) == set(BENCHMARKS) - {"gpu"}  # gpu: tests/test_launch_gpu_check.py


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_benchmark_cli_one_tiny_round_records_only_where_told(name, tmp_path):
    """``python -m benchmarks <name>`` end to end on a small setting: it exits 0 and
    appends its dated table to --output, never to the repository's BENCHMARKS.md (the
    command runs in tmp_path, so relative run folders land there too)."""
    options, expected = TINY[name]
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    out = tmp_path / "BENCH.md"
    before = hashlib.sha256((REPO / "BENCHMARKS.md").read_bytes()).hexdigest()
    cmd = [sys.executable, "-m", "benchmarks", name, *options, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert hashlib.sha256((REPO / "BENCHMARKS.md").read_bytes()).hexdigest() == before
    text = out.read_text()
    title = importlib.import_module(f"benchmarks.{name}").TITLE
    assert text.count(f"## {title} · ") == 1
    assert f"Command: `python -m benchmarks {name} " in text
    for s in expected:
        assert s in text, f"{s!r} not in the table:\n{text}"
    if name == "ablation":  # its own --out (not the harness's --output) got the runs
        assert (tmp_path / "abl" / "ast_gc" / "seed0" / "summary.json").is_file()
        assert (tmp_path / "abl.png").stat().st_size > 0
