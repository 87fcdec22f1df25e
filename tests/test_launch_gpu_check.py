"""The GPU acceptance check (scripts/gpu-check.sh, benchmarks/gpu.py) and the 2:4
bench's shapes, as far as a machine without a GPU can check them: the script parses, it
refuses cleanly without CUDA, the table is judged right from fake results, the child
process protocol reports a failing check as a FAIL row, and the default 2:4 shapes
satisfy torch's own constraints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run the check")


def test_gpu_check_script_parses() -> None:
    r = subprocess.run(["bash", "-n", "scripts/gpu-check.sh"], cwd=REPO, capture_output=True)
    assert r.returncode == 0, r.stderr


@no_cuda
@pytest.mark.timeout(120)
def test_gpu_check_refuses_without_cuda_and_runs_nothing(tmp_path: Path) -> None:
    bench_md = (REPO / "BENCHMARKS.md").read_bytes() if (REPO / "BENCHMARKS.md").exists() else b""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    r = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--workdir", str(tmp_path / "w")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA GPU" in r.stderr and "Nothing was run" in r.stderr
    assert not (tmp_path / "w").exists()
    # the module refuses too, when called without the script
    m = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--workdir", str(tmp_path / "w")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert m.returncode == 2 and "no CUDA GPU visible" in m.stderr, m.stderr
    assert not (tmp_path / "w").exists()
    after = (REPO / "BENCHMARKS.md").read_bytes() if (REPO / "BENCHMARKS.md").exists() else b""
    assert after == bench_md


def _subnets(nonzero: list[int], total: int = 1000, top1: float | None = 0.95) -> list[dict]:
    targets = [0.5, 0.8, 0.9]
    return [
        {
            "target_sparsity": s,
            "sparsity": 1 - n / total,
            "nonzero": n,
            "total": total,
            "top1": top1,
        }
        for s, n in zip(targets, nonzero, strict=True)
    ]


def _train(nonzero=(500, 200, 100), top1=0.95, **extra) -> dict:
    return {"summary": {"steps": 690, "subnets": _subnets(list(nonzero), top1=top1)}, **extra}


def test_train_rows_judge_sparsity_top1_and_decoder() -> None:
    ok = gpu.table_row("demo", {**_train(), "peak_gib": 0.123456}, 12.34)
    assert ok["status"] == "ok" and ok["peak GiB"] == 0.12 and ok["seconds"] == 12.3
    assert "sparsity exact" in ok["result"] and "95.0/95.0/95.0 %" in ok["result"]
    assert gpu.table_row("demo", _train(nonzero=(500, 201, 100)), 1)["status"] == "FAIL"
    low = gpu.table_row("deepspeed", _train(top1=0.89), 1)
    assert low["status"] == "FAIL" and "89.0" in low["result"]
    assert gpu.table_row("demo", _train(top1=None), 1)["status"] == "FAIL"  # not evaluated
    # without "total" in the summary the count is recovered from sparsity and nonzero
    legacy = _train()
    for s in legacy["summary"]["subnets"]:
        del s["total"]
    assert gpu.sparsity_exact(legacy["summary"]["subnets"])
    assert gpu.table_row("dali", _train(decoders=["mixed", "mixed"]), 1)["status"] == "ok"
    cpu = gpu.table_row("dali", _train(decoders=["cpu"]), 1)
    assert cpu["status"] == "FAIL" and "decoder cpu" in cpu["result"]
    assert gpu.table_row("dali", _train(), 1)["status"] == "FAIL"  # decoder never seen
    assert gpu.table_row("demo", {}, 1)["result"] == "no summary.json"


def test_bench_rows_judge_step_sparse24_sync_and_errors() -> None:
    rows = [
        {"variant": "dense", "wall s/step": "0.128 ± 0.001", "wall ratio": "", "goal": ""},
        {
            "variant": "ast_gc",
            "wall s/step": "0.160 ± 0.002",
            "wall ratio": "1.250 ± 0.010",
            "goal": "≤ 1.02",
            "met": False,
        },
    ]
    step = gpu.table_row("step", {"rows": rows, "batch": 128}, 60)
    assert step["status"] == "FAIL"
    assert "1.250 ± 0.010" in step["result"] and "images/s 800 vs 1,000 dense" in step["result"]
    rows[1]["met"] = True
    assert gpu.table_row("step", {"rows": rows, "batch": 128}, 60)["status"] == "ok"
    assert gpu.table_row("step", {"rows": rows[:1], "batch": 128}, 60)["status"] == "FAIL"

    r24 = {"rows": [{"speedup": 1.4, "max_rel_error": 1e-3}, {"speedup": 0.9, "max_rel_error": 0}]}
    s24 = gpu.table_row("sparse24", r24, 5)
    assert s24["status"] == "ok" and "0.90-1.40x" in s24["result"]
    r24["rows"][0]["max_rel_error"] = 0.5
    assert gpu.table_row("sparse24", r24, 5)["status"] == "FAIL"
    assert gpu.table_row("sparse24", {"skipped": "no GPU"}, 5)["status"] == "FAIL"

    sync = {"sync_warnings": 20, "steps": 20, "sites": ["train.py:10", "gc.py:5"]}
    s = gpu.table_row("sync", sync, 5)
    assert s["status"] == "ok" and "1.00/step" in s["result"] and "train.py:10" in s["result"]
    assert gpu.table_row("sync", {**sync, "sync_warnings": 21}, 5)["status"] == "FAIL"

    dead = gpu.table_row("sync", None, 90, "timed out after 90 s")
    assert dead == {
        "check": "sync",
        "status": "FAIL",
        "result": "timed out after 90 s",
        "seconds": 90.0,
        "peak GiB": None,
    }
    crashed = gpu.table_row("demo", {**_train(), "error": "dist_ast.train exited 1"}, 3)
    assert crashed["status"] == "FAIL" and crashed["result"] == "dist_ast.train exited 1"


def test_table_renders_every_row() -> None:
    from benchmarks import harness

    rows = [
        gpu.table_row("demo", {**_train(), "peak_gib": 1.5}, 10),
        gpu.table_row("sync", None, 90, "timed out after 90 s"),
    ]
    md = harness.markdown_table(rows)
    assert md.strip().count("\n") == 3  # header, rule, two rows
    assert "| demo | ok |" in md and "| sync | FAIL | timed out after 90 s |" in md


@no_cuda
@pytest.mark.timeout(240)
def test_child_processes_report_failures_as_rows(tmp_path: Path) -> None:
    """The real parent/child protocol on CPU: each check's failure is a FAIL row."""
    row = gpu.run_check("sparse24", tmp_path, timeout=200)
    assert row["status"] == "FAIL" and "skipped: no CUDA GPU" in row["result"], row
    assert row["peak GiB"] is None and (tmp_path / "sparse24.log").is_file()
    # train.device=cuda without a GPU: dist_ast.train stops at start (exit 2)
    row = gpu.run_check("demo", tmp_path, timeout=200)
    assert row["status"] == "FAIL" and row["result"] == "dist_ast.train exited 2", row
    assert "no CUDA device is visible" in (tmp_path / "demo.log").read_text()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse24_default_shapes_fit_torch_semi_structured(dtype: torch.dtype) -> None:
    from torch.sparse.semi_structured import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    from benchmarks import sparse24

    for cls in (SparseSemiStructuredTensorCUTLASS, SparseSemiStructuredTensorCUSPARSELT):
        c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
        for rows, cols in sparse24.DEFAULT_SHAPES:
            assert rows % c.sparse_min_rows == 0 and cols % c.sparse_min_cols == 0, (rows, cols)
        # the checkpoint filter agrees with torch on shapes around the limits
        for rows, cols in [(1000, 2048), (1024, 2048), (32, 64), (16, 64), (64, 96), (10, 512)]:
            fits = rows % c.sparse_min_rows == 0 and cols % c.sparse_min_cols == 0
            if cls is SparseSemiStructuredTensorCUTLASS:
                assert sparse24.valid_24_shape(rows, cols) == fits, (rows, cols)
            elif sparse24.valid_24_shape(rows, cols):
                assert fits, (rows, cols)  # what we accept, cuSPARSELt accepts too


def test_sparse24_through_the_bench_harness_without_gpu(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import harness

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the bench runs for real")
    assert harness.main(["sparse24", "--no-record", "--batch", "8"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
