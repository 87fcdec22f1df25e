"""Small-scale reproduction of the paper's ablation: individual training per sparsity,
joint training, AST, AST+GC (non-disjoint) and AST+GC with completely-subset masks,
several seeds each, one training at a time in this process.

Every run is ``dist_ast.train.run`` on a config composed as the command line would, so
the numbers are those of the shipped trainer. AST gets the same number of steps as one
individual run (so 1/N of the steps per sub-net); joint training the same number of
steps with all N sub-nets in each. A run whose ``summary.json`` exists is not redone, so
the command resumes after an interruption and can be rerun to re-aggregate.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.ablation")

TITLE = "ablation"

# name -> overrides on top of the common ones; {s} is replaced per sparsity.
METHODS: dict[str, list[str]] = {
    "ast_gc": ["ast=ast_gc", "ast.mask_relation=non_disjoint"],
    "ast": ["ast=ast", "ast.count_conflicts=true"],
    "individual": ["ast=individual"],
    "joint": ["ast=joint"],
    "ast_gc_cs": ["ast=ast_gc", "ast.mask_relation=completely_subset"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="cifar10", help="data config group (cifar10 or digits)")
    p.add_argument(
        "--data-root",
        default="runs/shards/cifar10_5k",
        help="shard directory (5,000-image train / 2,000-image test subset of CIFAR-10; see "
        "RESULTS.md for how it is made)",
    )
    p.add_argument("--model", default="tiny_cnn")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ramp-end-epoch", type=float, default=2.0)
    p.add_argument("--update-every", type=int, default=24, help="ΔT (steps)")
    p.add_argument("--stagger", type=int, default=8, help="Δτ (global steps)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=26,
        help="validation every this many steps, for --curve-methods on the first seed only",
    )
    p.add_argument("--curve-methods", nargs="*", default=["ast", "ast_gc"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--workers", type=int, default=0, help="loader workers")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--report-only", action="store_true", help="aggregate finished runs only")
    p.add_argument("--plot", type=Path, default=Path("results/ablation_ramp.png"))
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")


def plan(args: argparse.Namespace) -> list[tuple[str, int, list[str], Path]]:
    """(method label, seed, overrides, run dir) in the order to run: seed-major, so
    that a partial ablation has whole seeds."""
    common = [
        f"data={args.data}",
        f"model={args.model}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"optim.lr={args.lr}",
        f"ast.ramp_end_epoch={args.ramp_end_epoch}",
        f"ast.update_every={args.update_every}",
        f"ast.stagger={args.stagger}",
        "ast.initial_sparsity=0.0",
        "train.progress=false",
        "train.log_every=10",
        *args.extra,
    ]
    if args.data != "digits":
        common += [f"data.root={args.data_root}", f"data.num_workers={args.workers}"]
    sp = "[" + ",".join(str(s) for s in args.sparsities) + "]"
    out = []
    for seed in args.seeds:
        for method in args.methods:
            variants: list[tuple[str, list[str]]]
            if method == "individual":
                variants = [(f"individual_{s}", [f"ast.sparsities=[{s}]"]) for s in args.sparsities]
            else:
                variants = [(method, [f"ast.sparsities={sp}"])]
            for label, extra in variants:
                run_dir = args.out / label / f"seed{seed}"
                ov = [*common, *METHODS[method], *extra, f"train.seed={seed}"]
                if method in args.curve_methods and seed == args.seeds[0]:
                    ov.append(f"train.eval_every={args.eval_every}")
                out.append((label, seed, [*ov, f"run_dir={run_dir}"], run_dir))
    return out


def train_missing(args: argparse.Namespace) -> None:
    import torch

    from dist_ast.cli import compose_config
    from dist_ast.train import run

    torch.set_num_threads(args.threads)
    for label, seed, overrides, run_dir in plan(args):
        if (run_dir / "summary.json").exists():
            continue
        if run_dir.exists():  # an interrupted run: start it again from scratch
            for f in run_dir.glob("*"):
                if f.is_file():
                    f.unlink()
        log.info("training %s seed %d: %s", label, seed, " ".join(overrides))
        t0, c0 = time.perf_counter(), time.process_time()
        summary = run(compose_config(overrides))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        (run_dir / "timing.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
        log.info(
            "%s seed %d done in %.0f s wall, %.0f CPU-s: top-1 %s",
            label,
            seed,
            wall,
            cpu,
            [round(s["top1"], 4) for s in summary["subnets"]],
        )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(args: argparse.Namespace) -> dict[str, list[dict]]:
    """{label: [summary of each finished seed]}."""
    out: dict[str, list[dict]] = {}
    for label, _seed, _ov, run_dir in plan(args):
        f = run_dir / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            t = run_dir / "timing.json"
            s["timing"] = json.loads(t.read_text()) if t.exists() else {}
            out.setdefault(label, []).append(s)
    return out


def rows_from(results: dict[str, list[dict]], sparsities: list[float]) -> list[dict[str, Any]]:
    """One row per (method, sub-net): mean ± std top-1 over seeds, sparsity, FLOPs."""
    rows = []
    for label, runs in results.items():
        n_sub = len(runs[0]["subnets"])
        flops = statistics.fmean(r["train_flops"] for r in runs)
        cpu = [r["timing"].get("cpu_s") for r in runs if r["timing"].get("cpu_s")]
        for k in range(n_sub):
            top1 = [100 * r["subnets"][k]["top1"] for r in runs]
            m, s = _mean_std(top1)
            rows.append(
                {
                    "method": label,
                    "target sparsity": runs[0]["subnets"][k]["target_sparsity"],
                    "sparsity": statistics.fmean(r["subnets"][k]["sparsity"] for r in runs),
                    "top-1 %": f"{m:.2f} ± {s:.2f}",
                    "seeds": len(runs),
                    "train FLOPs (run)": flops,
                    "GC conflicts": (
                        f"{statistics.fmean(r['gc_conflicts'] for r in runs):.0f}/"
                        f"{statistics.fmean(r['gc_checked'] for r in runs):.0f}"
                        if n_sub > 1 and label != "joint"
                        else ""
                    ),
                    "CPU-s/run": statistics.fmean(cpu) if cpu else None,
                }
            )
    return rows


def eval_curves(run_dir: Path) -> tuple[list[int], list[list[float]], list[dict]]:
    """(steps, top-1 per sub-net per eval, mask-update records) from metrics.jsonl."""
    steps: list[int] = []
    acc: list[list[float]] = []
    updates: list[dict] = []
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return steps, acc, updates
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            steps.append(rec["step"])
            acc.append([e["top1"] for e in sorted(rec["eval"], key=lambda e: e["index"])])
        elif rec.get("mask_update"):
            updates.append(rec)
    return steps, acc, updates


def plot_curves(args: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    """Validation top-1 of each sub-net through the sparsity ramp (first seed); returns
    per (method, sub-net) the worst accuracy during the ramp and the drop from the best
    earlier value, the collapse check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = args.seeds[0]
    found = []
    for method in args.curve_methods:
        steps, acc, _ = eval_curves(args.out / method / f"seed{seed}")
        if len(steps) > 1:
            found.append((method, steps, acc))
    if not found:
        return []
    fig, axes = plt.subplots(1, len(found), figsize=(5 * len(found), 3.6), squeeze=False)
    checks = []
    cfg = json.loads((args.out / found[0][0] / f"seed{seed}" / "config.json").read_text())
    for ax, (method, steps, acc) in zip(axes[0], found, strict=True):
        for k in range(len(acc[0])):
            ys = [100 * a[k] for a in acc]
            ax.plot(steps, ys, marker="o", ms=3, label=f"s={args.sparsities[k]}")
            best, worst_drop = -1.0, 0.0
            for y in ys:
                worst_drop = max(worst_drop, best - y) if best >= 0 else 0.0
                best = max(best, y)
            checks.append(
                {
                    "method": method,
                    "sub-net": k,
                    "min top-1 % (after first eval)": min(ys[1:]) if len(ys) > 1 else ys[0],
                    "largest drop from an earlier best (points)": worst_drop,
                    "final top-1 %": ys[-1],
                }
            )
        ax.set_title(f"{method} (seed {seed})")
        ax.set_xlabel("step")
        ax.set_ylabel("val top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    spe = None
    ramp_end = cfg["ast"]["ramp_end_epoch"]
    summary = json.loads((args.out / found[0][0] / f"seed{seed}" / "summary.json").read_text())
    epochs = cfg["train"]["epochs"]
    if epochs:
        spe = summary["steps"] / epochs
    if spe:
        for ax in axes[0]:
            ax.axvline(ramp_end * spe, color="gray", ls="--", lw=1)
    fig.suptitle("validation top-1 through the sparsity ramp (dashed: ramp end)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return checks


last_checks: list[dict[str, Any]] = []


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train what is missing, then one row per (method, sub-net)."""
    if not args.report_only:
        train_missing(args)
    results = collect(args)
    rows = rows_from(results, args.sparsities)
    last_checks[:] = plot_curves(args, args.plot)
    (args.out / "rows.json").parent.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps({"rows": rows, "curves": last_checks}, indent=1))
    return rows


def last_notes() -> str:
    if not last_checks:
        return ""
    worst = max(last_checks, key=lambda c: c["largest drop from an earlier best (points)"])
    return (
        f"Ramp check (first seed): largest drop of a sub-net's validation top-1 from its earlier "
        f"best is {worst['largest drop from an earlier best (points)']:.1f} points "
        f"({worst['method']}, sub-net {worst['sub-net']})."
    )


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["ablation", *sys.argv[1:]]))
