"""GPU acceptance check: what only a CUDA GPU can show, in one table, in < 8 minutes.

    python -m benchmarks gpu [--no-record]   # prints the table, appends it to BENCHMARKS.md;
    python -m benchmarks.gpu [--no-record]   # the same; exit 1 when a check failed, 2 no GPU
    bash scripts/gpu-check.sh                # the latter, after checking that CUDA is there

Run from the repository root (BENCHMARKS.md there is the default ``--output``).

Every check runs in its own process (a crash or a hang fails that row only; each has a
timeout and all share one budget) and reports the process's peak GPU memory:

- ``demo``: ``experiment=demo`` on CUDA in bf16 with channels_last; every sub-net's live
  count exactly round((1 - s_k) * total), top-1 >= 90 %.
- ``dali``: the demo from shards (``data=digits_shards data.loader=dali``); the decoder
  DALI was asked for (seen by a spy on ``fn.decoders``) must be ``mixed``.
- ``deepspeed``: the demo with ``engine=deepspeed engine.zero_stage=2`` in bf16, one GPU.
- ``step``: ``bench step`` for ResNet-50 224² at batch 128 in bf16 with channels_last:
  the AST+GC / dense step-time ratio and images/s of both.
- ``sparse24``: ``bench sparse24`` on its default shapes: speed-up range, max error.
- ``sync``: 20 AST+GC training steps (ResNet-50, batch 32, no logging, no mask update)
  under ``torch.cuda.set_sync_debug_mode("warn")``: the number of host-device
  synchronizations (goal: at most one per step) and where the first ones happen.

Without a CUDA GPU it stops at once with a message saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.gpu")

TITLE = "gpu check"
NOTES = (
    "One process per check; `peak GiB` is torch.cuda.max_memory_allocated() of that "
    "process. `sync`: synchronizations reported by torch.cuda.set_sync_debug_mode('warn') "
    "over 20 training steps that neither log nor update masks (goal <= 1 per step)."
)
CHECKS = ("demo", "dali", "deepspeed", "step", "sparse24", "sync")
BUDGET_S = 450.0  # all checks together: < 8 minutes with start-up
TIMEOUT_S = {"demo": 120, "dali": 120, "deepspeed": 150, "step": 150, "sparse24": 90, "sync": 90}
MIN_TOP1 = 0.90
SYNC_STEPS = 20
# Where the ``benchmarks`` package is importable from, for the child processes (their
# working directory is the parent's).
_IMPORT_ROOT = str(Path(__file__).resolve().parent.parent)

DEMO = ["experiment=demo", "train.device=cuda", "train.progress=false"]
TRAIN_OVERRIDES: dict[str, list[str]] = {
    "demo": [*DEMO, "train.precision=bf16", "train.channels_last=true"],
    "dali": [*DEMO, "data=digits_shards", "data.loader=dali"],
    "deepspeed": [*DEMO, "engine=deepspeed", "engine.zero_stage=2", "train.precision=bf16"],
}


def unavailable_reason() -> str | None:
    """Why the check cannot run on this machine, or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            "no CUDA GPU visible (torch.cuda.is_available() is False): the GPU check needs "
            "one NVIDIA GPU; nothing was run"
        )
    return None


# -- judging one check's result (pure: unit-tested on fake results) ----------------------
def sparsity_exact(subnets: Sequence[dict[str, Any]]) -> bool:
    """Every sub-net keeps exactly round((1 - s_k) * total) weights."""
    for s in subnets:
        total = s.get("total") or round(s["nonzero"] / (1.0 - s["sparsity"]))
        if s["nonzero"] != round((1.0 - s["target_sparsity"]) * total):
            return False
    return True


def judge_train(name: str, result: dict[str, Any]) -> tuple[bool, str]:
    """A training check: summary written, exact sparsity, top-1 (and DALI's decoder)."""
    summary = result.get("summary")
    if not summary:
        return False, "no summary.json"
    subnets = summary["subnets"]
    top1 = [s.get("top1") for s in subnets]
    exact = sparsity_exact(subnets)
    ok = exact and all(t is not None and t >= MIN_TOP1 for t in top1)
    text = (
        f"{summary['steps']} steps, sparsity {'exact' if exact else 'NOT exact'}, top-1 "
        + "/".join("-" if t is None else f"{100 * t:.1f}" for t in top1)
        + " %"
    )
    if name == "dali":
        decoders = sorted(set(result.get("decoders", [])))
        ok = ok and decoders == ["mixed"]
        text += f", decoder {'+'.join(decoders) or 'unknown'}"
    return ok, text


def _median(cell: str) -> float:
    """The median of a harness ``Stats.fmt`` cell, e.g. ``"0.153 ± 0.004"``."""
    return float(str(cell).split()[0])


def judge_step(result: dict[str, Any]) -> tuple[bool, str]:
    """The step bench: AST+GC / dense wall-time ratio (goal from the bench) and images/s."""
    rows = {r["variant"]: r for r in result.get("rows", [])}
    if "dense" not in rows or "ast_gc" not in rows:
        return False, "bench step gave no dense and ast_gc rows"
    batch = result["batch"]
    ips = {v: batch / _median(rows[v]["wall s/step"]) for v in ("dense", "ast_gc")}
    gc = rows["ast_gc"]
    text = (
        f"AST+GC/dense {gc['wall ratio']} (goal {gc['goal']}), images/s "
        f"{ips['ast_gc']:,.0f} vs {ips['dense']:,.0f} dense"
    )
    return bool(gc.get("met")), text


def judge_sparse24(result: dict[str, Any]) -> tuple[bool, str]:
    """2:4 bench: ran, outputs agree with dense (bf16/fp16 tolerance), speed-up range."""
    if "skipped" in result:
        return False, f"skipped: {result['skipped']}"
    rows = result.get("rows", [])
    if not rows:
        return False, "no rows"
    speed = [r["speedup"] for r in rows]
    err = max(r["max_rel_error"] for r in rows)
    text = f"{len(rows)} shapes x batches, speed-up {min(speed):.2f}-{max(speed):.2f}x, "
    text += f"max rel. error {err:.1e}"
    return err < 2e-2, text


def judge_sync(result: dict[str, Any]) -> tuple[bool, str]:
    """Host-device synchronizations over the timed steps; goal at most one per step."""
    n, steps = result["sync_warnings"], result["steps"]
    sites = result.get("sites", [])
    text = f"{n} syncs in {steps} steps ({n / steps:.2f}/step)"
    if sites:
        text += "; first at " + ", ".join(sites[:3])
    return n <= steps, text


JUDGES: dict[str, Callable[..., tuple[bool, str]]] = {
    "step": judge_step,
    "sparse24": judge_sparse24,
    "sync": judge_sync,
}


def table_row(
    name: str,
    result: dict[str, Any] | None,
    seconds: float,
    error: str | None = None,
) -> dict[str, Any]:
    """One row of the table from a check's result file (None: the process died first)."""
    result = result or {}
    if error is None and result.get("error"):
        error = result["error"]
    if error is not None:
        ok, text = False, error
    elif name in TRAIN_OVERRIDES:
        ok, text = judge_train(name, result)
    else:
        ok, text = JUDGES[name](result)
    peak = result.get("peak_gib")
    return {
        "check": name,
        "status": "ok" if ok else "FAIL",
        "result": text,
        "seconds": round(seconds, 1),
        "peak GiB": None if peak is None else round(peak, 2),
    }


# -- the child processes ------------------------------------------------------------------
@contextlib.contextmanager
def _decoder_spy(seen: list[str]) -> Iterator[None]:
    """Record the ``device`` DALI's image decoders are built with (mixed = GPU decoding)."""
    try:
        from nvidia.dali import fn
    except ImportError:
        yield
        return
    names = ("image", "image_random_crop")
    originals = {n: getattr(fn.decoders, n) for n in names}

    def spy(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **kw: Any) -> Any:
            seen.append(str(kw.get("device", "cpu")))
            return orig(*a, **kw)

        return wrapped

    for n, f in originals.items():
        setattr(fn.decoders, n, spy(f))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(fn.decoders, n, f)


def _child_train(name: str, workdir: Path, out: dict[str, Any]) -> int:
    import runpy

    run_dir = workdir / name
    sys.argv = ["dist_ast.train", *TRAIN_OVERRIDES[name], f"run_dir={run_dir}"]
    decoders: list[str] = []
    out["decoders"] = decoders
    code: int = 0
    with _decoder_spy(decoders):
        try:
            runpy.run_module("dist_ast.train", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    summary = run_dir / "summary.json"
    if summary.is_file():
        out["summary"] = json.loads(summary.read_text())
    if code != 0:
        out["error"] = f"dist_ast.train exited {code}"
    return code


def _child_step(workdir: Path, out: dict[str, Any]) -> int:
    from benchmarks import harness, step

    os.chdir(workdir)  # the bench's trainers write under runs/bench/
    batch = 128
    args = harness.parse_args(
        step,
        ["--presets", "r50_224", "--variants", "dense", "ast_gc", "--batch-size", str(batch)]
        + ["--precision", "bf16", "--channels-last", "true", "--device", "cuda"]
        + ["--repeats", "5", "--warmup", "3"],
    )
    out["rows"] = step.run(args)
    out["batch"] = batch
    return 0


def _child_sparse24(out: dict[str, Any]) -> int:
    from benchmarks import sparse24

    out.update(sparse24.measure(batches=(256, 1024, 4096), dtype="bf16"))
    return 0


def _child_sync(workdir: Path, out: dict[str, Any]) -> int:
    import warnings

    import torch

    from benchmarks.step import build_trainer_variant, trainer_step_fn

    trainer = build_trainer_variant(
        "ast_gc",
        model="resnet50",
        small_input=False,
        image_size=224,
        num_classes=1000,
        batch_size=32,
        sparsities=[0.8, 0.9, 0.95],
        device=torch.device("cuda"),
        precision="bf16",
        channels_last=True,
        run_dir=str(workdir / "sync"),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 224, 224, generator=g).cuda()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (32,), generator=g).cuda()
    step = trainer_step_fn(trainer, x, y)
    for _ in range(3):  # warm-up: allocator, cuDNN autotuning, lazy state
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(SYNC_STEPS):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    out["sync_warnings"] = len(syncs)
    out["steps"] = SYNC_STEPS
    out["sites"] = list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))
    return 0


def child_main(name: str, out_path: Path, workdir: Path) -> int:
    """Run one check in this process; write its result and peak memory to ``out_path``."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: dict[str, Any] = {}
    code = 1
    try:
        if name in TRAIN_OVERRIDES:
            code = _child_train(name, workdir, out)
        elif name == "step":
            code = _child_step(workdir, out)
        elif name == "sparse24":
            code = _child_sparse24(out)
        elif name == "sync":
            code = _child_sync(workdir, out)
        else:
            raise ValueError(f"unknown check {name!r}")
    except Exception as e:  # reported in the table; the traceback is in the log
        log.exception("check %s failed", name)
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        if torch.cuda.is_available():
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out_path.write_text(json.dumps(out, default=str))
    return code


# -- the parent ------------------------------------------------------------------------------
def run_check(name: str, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one check in a child process; its table row."""
    out_path = workdir / f"{name}.json"
    logfile = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", name, str(out_path)]
    cmd += ["--workdir", str(workdir)]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_IMPORT_ROOT, path) if p)}
    log.info("gpu check %s (timeout %.0f s, log %s)", name, timeout, logfile)
    t0 = time.perf_counter()
    error = None
    with open(logfile, "w") as f:
        try:
            rc = subprocess.run(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc, error = None, f"timed out after {timeout:.0f} s (log {logfile})"
    seconds = time.perf_counter() - t0
    result = json.loads(out_path.read_text()) if out_path.is_file() else None
    if error is None and rc != 0 and not (result or {}).get("error"):
        error = f"exit code {rc} (log {logfile})"
    return table_row(name, result, seconds, error)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="all checks together")
    p.add_argument("--workdir", default=None, help="run folders and logs (default: a temp dir)")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every selected check, in order, within the budget; the table's rows."""
    reason = unavailable_reason()
    if reason is not None:
        log.error("gpu check: %s", reason)
        raise SystemExit(2)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dist_ast-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows = []
    for name in args.only:
        left = deadline - time.monotonic()
        if left < 10:
            rows.append(table_row(name, None, 0.0, "not run: the time budget was spent"))
            continue
        rows.append(run_check(name, workdir, min(TIMEOUT_S[name], left)))
    log.info("gpu check logs and run folders: %s", workdir)
    return rows


def exit_code(rows: list[dict[str, Any]]) -> int:
    """1 when a check failed (the harness's exit code for this bench)."""
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks gpu`` (exit 1 when a check failed, 2 without a GPU), or
    one check in this process when called as a child (``--child NAME OUT --workdir DIR``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        name, out_path = argv[1], Path(argv[2])
        workdir = Path(argv[argv.index("--workdir") + 1])
        return child_main(name, out_path, workdir)
    from benchmarks import harness

    return harness.main(["gpu", *argv])


if __name__ == "__main__":
    sys.exit(main())
