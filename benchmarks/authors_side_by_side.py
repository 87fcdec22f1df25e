"""dist_ast side by side with the AST authors' released code (issue 14, item 2).

The task: the authors' CIFAR ResNet-20 on a 10,000-image CIFAR-10 training subset (1,000
images per class, a seeded random draw from each class's 5,000) and the full 10,000-image
test set, 15 epochs (``configs/experiment/r20_cifar_ast.yaml``; RESULTS.md has the whole
definition and the authors' side step by step).

    python -m benchmarks.authors_side_by_side subset          # shards (+ ImageFolder copy)
    python -m benchmarks.authors_side_by_side train --seeds 0 1   # our AST+GC, table
    python -m benchmarks.authors_side_by_side train --label no_regrow --seeds 0 \\
        --extra ast.regrow_fraction=0 ast.regrow_fraction_min=0
    python -m benchmarks.authors_side_by_side time --authors-dir <checkout of
        mengjian0502/AST>                                   # per-step time, ours / theirs

``subset`` writes the training subset as an ImageFolder tree (the authors' loader reads
it) and as our shards, from the same list of files (``subset.txt``). ``train`` runs
``python -m dist_ast.train experiment=r20_cifar_ast`` once per seed (a run whose
``summary.json`` exists is kept, so the command resumes) and prints top-1 per sparsity,
mean and spread over seeds. ``time`` times one training step of each implementation in
the same process, in interleaved rounds (see ``time_steps``); the authors' code is
imported from ``--authors-dir`` with CPU shims applied at run time and is never part of
this repository.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import os
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("authors_side_by_side")

SPARSITIES = (0.5, 0.8, 0.9)


# -- the data subset ----------------------------------------------------------------------
def choose_subset(names_by_class: dict[str, list[str]], per_class: int, seed: int) -> list[str]:
    """``per_class`` files of each class, drawn uniformly without replacement with one
    seeded generator over the classes in sorted order; returned sorted."""
    rng = random.Random(seed)
    out: list[str] = []
    for cls in sorted(names_by_class):
        names = sorted(names_by_class[cls])
        if len(names) < per_class:
            raise SystemExit(f"class {cls} has {len(names)} training images < {per_class}")
        out += sorted(rng.sample(names, per_class))
    return out


def make_subset(args: argparse.Namespace) -> None:
    """ImageFolder tree (train subset + the full test set) and our shards from it."""
    folder, shards = Path(args.folder), Path(args.shards)
    with tarfile.open(args.tar) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[str, list[str]] = {}
        for m in members:
            parts = Path(m.name).parts
            if parts[-3] == "train":
                by_class.setdefault(parts[-2], []).append(m.name)
        chosen = set(choose_subset(by_class, args.per_class, args.seed))
        keep = [m for m in members if m.name in chosen or Path(m.name).parts[-3] == "test"]
        folder.mkdir(parents=True, exist_ok=True)
        for m in keep:
            parts = Path(m.name).parts
            dst = folder / parts[-3] / parts[-2] / parts[-1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            dst.write_bytes(src.read())
    listing = sorted("/".join(Path(n).parts[-3:]) for n in chosen)
    (folder / "subset.txt").write_text("\n".join(listing) + "\n")
    n_test = sum(1 for m in keep if Path(m.name).parts[-3] == "test")
    log.info("%s: %d training images, %d test images", folder, len(chosen), n_test)
    if args.no_shards:
        return
    cmd = [sys.executable, "-m", "dist_ast.data.shards", "--src", str(folder), "--out"]
    cmd += [str(shards), "--workers", "1", "--seed", str(args.shard_seed)]
    log.info("%s", shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    (shards / "subset.txt").write_text("\n".join(listing) + "\n")


# -- our side: N seeds and a table ------------------------------------------------------
def run_dir_of(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.out) / args.label / f"seed{seed}"


def train_seeds(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for seed in args.seeds:
        run_dir = run_dir_of(args, seed)
        if (run_dir / "summary.json").exists():
            log.info("%s exists: kept", run_dir / "summary.json")
            continue
        cmd = [sys.executable, "-m", "dist_ast.train", f"experiment={args.experiment}"]
        cmd += [f"train.seed={seed}", f"run_dir={run_dir}", "train.progress=false", *args.extra]
        log.info("%s", shlex.join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        (run_dir / "timing.json").write_text(json.dumps({"wall_s": wall}))


def table_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per sub-net: top-1 of every finished seed, mean and half-range."""
    runs = []
    for seed in args.seeds:
        f = run_dir_of(args, seed) / "summary.json"
        if f.exists():
            runs.append((seed, json.loads(f.read_text())))
    rows: list[dict[str, Any]] = []
    if not runs:
        return rows
    for k, sub in enumerate(runs[0][1]["subnets"]):
        top1 = [100 * s["subnets"][k]["top1"] for _, s in runs]
        rows.append(
            {
                "run": args.label,
                "target sparsity": sub["target_sparsity"],
                "measured sparsity": statistics.fmean(s["subnets"][k]["sparsity"] for _, s in runs),
                "top-1 % per seed": " / ".join(f"{v:.2f}" for v in top1),
                "seeds": ",".join(str(seed) for seed, _ in runs),
                "mean top-1 %": round(statistics.fmean(top1), 2),
                "± half-range": round((max(top1) - min(top1)) / 2, 2),
            }
        )
    return rows


def train(args: argparse.Namespace) -> None:
    from rich.console import Console

    from benchmarks.harness import rich_table

    if not args.report_only:
        train_seeds(args)
    rows = table_rows(args)
    Console(width=160).print(rich_table(f"{args.experiment} · {args.label}", rows))
    out = Path(args.out) / args.label / "rows.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


# -- per-step time, ours and the authors', interleaved -----------------------------------
# (our model name, the authors' model class, the authors' models module)
MODELS = {
    "resnet20": ("resnet20", "uresnet20"),
    "wrn32": ("wrn32", "uwresnet32"),
}


def _cpu_shims() -> None:
    """What the authors' code needs to import and run on a CPU in this environment: every
    ``.cuda()`` is the identity when CUDA is absent, and the modules it imports only for
    logging (wandb, pandas, tabulate) are empty stand-ins when not installed; nothing on
    the timed path uses them."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    for name in ("wandb", "pandas", "tabulate"):
        try:
            __import__(name)
        except ImportError:
            stub: Any = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            stub.tabulate = lambda rows, headers=(), **_: "\n".join(map(str, [headers, *rows]))
            sys.modules[name] = stub


class _Len:
    """Stands in for the authors' train loader where only ``len()`` is read (the ramp)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def authors_stepper(
    authors_dir: Path,
    model_cls: str,
    *,
    batches: list[tuple[Any, Any]],
    steps_per_epoch: int,
    epochs: int,
    update_every: int,
    offset: int,
    ramp_end_epoch: int,
    pc_grad: bool,
    start_step: int,
) -> Callable[[int], None]:
    """``f(n)``: n consecutive training steps of the authors' ``trainIter`` (their AST
    step: switch, forward/backward, mask step with prune-and-regrow when due, gradient
    masking, optional ``--pc_grad``, accuracy and sparsity bookkeeping, SGD step),
    continuing the global step count across calls from ``start_step`` (their counters
    set as after that many steps: the global count, each sub-net's own count, the regrow
    fraction's scheduler)."""
    import torch
    from torch import nn

    _cpu_shims()
    sys.path.insert(0, str(authors_dir))
    import models as a_models  # noqa: PLC0415  (the authors' package, from authors_dir)
    from pruners import CosineDecay, Mask
    from train import trainIter
    from utils import AverageMeter

    slist = [round(1 - s, 6) for s in SPARSITIES]
    args = argparse.Namespace(
        init_density=1.0, final_density=slist[-1], update_frequency=update_every,
        init_prune_epoch=0, final_prune_epoch=ramp_end_epoch, multiplier=1,
        pc_grad=pc_grad, pruner="iterative", mixed_prec=False, ngpu=1,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = getattr(a_models, model_cls)
    kwargs = {**cfg.kwargs, "num_classes": 10, "nspars": len(slist), "uspars": True}
    model = cfg.base(*cfg.args, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    decay = CosineDecay(0.5, T_max=steps_per_epoch * epochs)
    mask = Mask(model, optimizer=opt, prune_rate=0.5, prune_rate_decay=decay, args=args,
                train_loader=_Len(steps_per_epoch), slist=slist, Itertrain=True,
                offset=offset)  # fmt: skip
    mask.reg_masks(train=True)
    total_iter = AverageMeter()
    total_iter.val = start_step
    n_sub = len(slist)
    mask.steps = [max(0, -(-(start_step - k) // n_sub)) for k in range(n_sub)]
    for _ in range(start_step):
        decay.step()
    criterion = nn.CrossEntropyLoss()
    pos = [0]

    def run(n: int) -> None:
        data = [batches[(pos[0] + i) % len(batches)] for i in range(n)]
        trainIter(model, data, criterion, opt, None, mask, args, slist=slist,
                  total_iter=total_iter)  # fmt: skip
        pos[0] += n

    sys.path.remove(str(authors_dir))
    return run


def ours_stepper(
    model: str,
    *,
    batches: list[tuple[Any, Any]],
    train_size: int,
    epochs: int,
    update_every: int,
    stagger: int,
    ramp_end_epoch: int,
    run_dir: str,
    start_step: int,
    ast: str = "ast_gc",
) -> Callable[[int], None]:
    """``f(n)``: n consecutive ``Trainer.train_step`` calls of ``python -m
    dist_ast.train experiment=r20_cifar_ast`` (with this model and in-memory data of the
    task's size, so the schedule is the task's), mask updates included. ``ast``: the
    ``ast=`` preset (``ast_gc``, the experiment's; ``ast``, without gradient correction,
    like the authors' runs without ``--pc_grad``)."""
    from dist_ast.cli import compose_config
    from dist_ast.distributed.setup import init_distributed
    from dist_ast.train import build_trainer

    cfg = compose_config(
        [
            "experiment=r20_cifar_ast",
            f"model={model}",
            f"ast={ast}",
            "data=synthetic",
            f"data.synthetic_size={train_size}",
            "data.image_size=32",
            f"train.epochs={epochs}",
            f"ast.update_every={update_every}",
            f"ast.stagger={stagger}",
            f"ast.ramp_end_epoch={ramp_end_epoch}",
            "train.device=cpu",
            "train.progress=false",
            "train.tensorboard=false",
            f"run_dir={run_dir}",
        ]
    )
    trainer = build_trainer(cfg, init_distributed("cpu"))
    trainer.model.train()
    trainer.step = start_step
    log_every = cfg.train.log_every
    pos = [0]

    def run(n: int) -> None:
        for i in range(n):
            x, y = batches[(pos[0] + i) % len(batches)]
            out = trainer.train_step(x, y)
            trainer.step += 1
            if trainer.step % log_every == 0 or out["mask_update"]:
                float(out["loss"])  # what fit() reads on a log step
        pos[0] += n

    return run


# the variants of each side: ours by ``ast=`` preset, theirs by whether --pc_grad is on
OURS = {"ast_gc": "AST+GC", "ast": "AST (no GC)"}
THEIRS = {"plain": False, "pc_grad": True}


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order: rotated by r and reversed on odd rounds, so that over the rounds
    every variant runs early and late, before and after each other one."""
    k = r % len(names)
    order = names[k:] + names[:k]
    return order if r % 2 == 0 else order[::-1]


def time_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved rounds: each round runs ``--round-steps`` consecutive training steps of
    each variant (ours: ``--ours``, e.g. AST+GC and AST without GC; theirs: ``--theirs``,
    plain and/or ``--pc_grad``; order rotating by round, see ``round_order``), every one
    continuing its own run from where the last round stopped, so round r of all covers the
    same global steps and therefore the same scheduled mask updates (ΔT = 150 global
    steps, Δτ = 10 own steps = 30 global; with ``--start-step`` a multiple of ΔT and
    ``--rounds`` x ``--round-steps`` one, the timed steps hold 3 updates per ΔT, as
    training does). The ratio of a round is ours/theirs over the same steps; the table
    has one row per (ours, theirs) pair with the median of the per-round ratios, its
    interquartile range and range, for wall and process CPU time."""
    import torch

    from benchmarks.harness import machine_description, paired_ratios, summarize

    torch.set_num_threads(args.threads)
    theirs_variants = list(dict.fromkeys([*args.theirs, *(["pc_grad"] if args.pc_grad else [])]))
    rows = []
    for name in args.models:
        ours_model, theirs_model = MODELS[name]
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(args.batch_size, 3, 32, 32, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g))
            for _ in range(8)
        ]  # fmt: skip
        fns: dict[str, Callable[[int], None]] = {}
        for v in args.ours:
            fns[f"ours:{v}"] = ours_stepper(
                ours_model, batches=batches, train_size=args.train_size, epochs=args.epochs,
                update_every=args.update_every, stagger=args.offset * len(SPARSITIES),
                ramp_end_epoch=args.ramp_end_epoch, run_dir=f"runs/bench/authors/{name}_{v}",
                start_step=args.start_step - args.warmup, ast=v,
            )  # fmt: skip
        for v in theirs_variants:
            fns[f"theirs:{v}"] = authors_stepper(
                Path(args.authors_dir), theirs_model, batches=batches,
                steps_per_epoch=-(-args.train_size // args.batch_size), epochs=args.epochs,
                update_every=args.update_every, offset=args.offset,
                ramp_end_epoch=args.ramp_end_epoch, pc_grad=THEIRS[v],
                start_step=args.start_step - args.warmup,
            )  # fmt: skip
        for f in fns.values():  # warm-up (allocator, first-call costs), untimed
            f(args.warmup)
        clocks = {"wall": time.perf_counter, "cpu": time.process_time}
        samples: dict[str, dict[str, list[float]]] = {c: {k: [] for k in fns} for c in clocks}
        for r in range(args.rounds):
            for who in round_order(list(fns), r):
                t0 = {c: f() for c, f in clocks.items()}
                fns[who](args.round_steps)
                for c, f in clocks.items():
                    samples[c][who].append((f() - t0[c]) / args.round_steps)
            log.info(
                "%s round %d (cpu s/step): %s", name, r,
                ", ".join(f"{k} {samples['cpu'][k][-1]:.3f}" for k in fns),
            )  # fmt: skip
        for ov in args.ours:
            for tv in theirs_variants:
                o, t = f"ours:{ov}", f"theirs:{tv}"
                row: dict[str, Any] = {"model": f"{name} b{args.batch_size}"}
                row["ours"] = OURS[ov]
                row["theirs"] = "--pc_grad" if THEIRS[tv] else "plain (no GC)"
                row["rounds"] = args.rounds
                row["steps/round"] = args.round_steps
                for c in clocks:
                    row[f"ours {c} s/step"] = summarize(samples[c][o]).fmt(3)
                    row[f"theirs {c} s/step"] = summarize(samples[c][t]).fmt(3)
                    ratio = paired_ratios({o: samples[c][o], t: samples[c][t]}, t)[o]
                    row[f"{c} ratio ours/theirs"] = (
                        f"{ratio.fmt(3)} (range {ratio.min:.3f}–{ratio.max:.3f}; "
                        f"{sum(x < samples[c][t][i] for i, x in enumerate(samples[c][o]))}"
                        f"/{args.rounds} rounds ours faster)"
                    )
                rows.append(row)
        (Path("runs/bench/authors") / f"{name}_samples.json").write_text(json.dumps(samples))
    log.info("machine: %s", machine_description())
    return rows


def time_cmd(args: argparse.Namespace) -> None:
    from rich.console import Console

    from benchmarks.harness import (
        append_markdown,
        machine_description,
        markdown_section,
        rich_table,
    )

    Path("runs/bench/authors").mkdir(parents=True, exist_ok=True)
    rows = time_steps(args)
    Console(width=200).print(rich_table("authors vs dist_ast step", rows))
    if args.record:
        argv, rest = [], iter(sys.argv[1:])
        for a in rest:  # no machine paths: --output dropped, --authors-dir a placeholder
            if a in ("--output", "--authors-dir"):
                value = next(rest, "")
                if a == "--authors-dir":
                    argv += [a, value if not value.startswith("/") else "<AST checkout>"]
            elif not a.startswith("/"):
                argv.append(a)
        cmd = "python -m benchmarks.authors_side_by_side " + shlex.join(argv)
        notes = (
            "Per-step time of one AST training step, ours (`Trainer.train_step`, AST+GC "
            "and/or AST without GC) and the authors' (`trainIter` of mengjian0502/AST, CPU "
            "shims only; plain = no --pc_grad, as their run_cifar.sh), same process, same "
            "synthetic batches, the task's schedule with mask updates included; round r of "
            "every variant covers the same global steps, the order rotating by round. Ratio "
            "= median of per-round ratios (± half the IQR), range, and in how many rounds "
            "ours was faster. " + args.notes
        )
        append_markdown(
            Path(args.output),
            markdown_section(
                "authors side by side",
                rows,
                command=cmd,
                machine=machine_description(),
                notes=notes,
            ),  # fmt: skip
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("subset", help="write the training subset (ImageFolder + shards)")
    s.add_argument("--tar", default=str(ROOT.parent / "shared/data/cifar10/cifar10-jpeg.tar.gz"))
    s.add_argument("--per-class", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0, help="seed of the draw")
    s.add_argument("--folder", default="runs/cifar10_10k_imagefolder")
    s.add_argument("--shards", default="runs/shards/cifar10_10k")
    s.add_argument("--shard-seed", type=int, default=0, help="the shard writer's shuffle seed")
    s.add_argument("--no-shards", action="store_true", help="ImageFolder tree only")

    t = sub.add_parser("train", help="our AST+GC on the task, one run per seed, and a table")
    t.add_argument("--experiment", default="r20_cifar_ast")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    t.add_argument("--label", default="ast_gc", help="name of this variant (run folder)")
    t.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    t.add_argument("--out", default="runs/authors_side_by_side")
    t.add_argument("--report-only", action="store_true")

    m = sub.add_parser("time", help="per-step time, ours vs the authors', interleaved")
    m.add_argument("--authors-dir", required=True, help="a checkout of mengjian0502/AST")
    m.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--train-size", type=int, default=10000, help="sets the steps per epoch")
    m.add_argument("--epochs", type=int, default=15)
    m.add_argument("--update-every", type=int, default=150, help="ΔT (global steps)")
    m.add_argument("--offset", type=int, default=10, help="Δτ in the authors' own steps")
    m.add_argument("--ramp-end-epoch", type=int, default=10)
    m.add_argument("--rounds", type=int, default=6)
    m.add_argument("--round-steps", type=int, default=50)
    m.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    m.add_argument(
        "--start-step",
        type=int,
        default=150,
        help="global step of the first timed step (both runs start there, from dense masks; "
        "the first mask update is at ΔT)",
    )
    m.add_argument("--threads", type=int, default=1)
    m.add_argument(
        "--ours", nargs="+", default=list(OURS), choices=list(OURS), help="our ast= presets"
    )
    m.add_argument(
        "--theirs", nargs="+", default=["plain"], choices=list(THEIRS),
        help="the authors' variants: plain (no --pc_grad, as released) and/or pc_grad",
    )  # fmt: skip
    m.add_argument("--pc-grad", action="store_true", help="same as adding --theirs pc_grad")
    m.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    m.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    m.add_argument("--notes", default="")

    args = p.parse_args(argv)
    {"subset": make_subset, "train": train, "time": time_cmd}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
