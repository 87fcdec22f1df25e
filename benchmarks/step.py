"""Training step time: AST (alternating), AST+GC and joint training of N sub-nets vs
plain dense training of the same torchvision model, same batch, synthetic data.

The sparse variants run the shipped ``Trainer.train_step`` (built by
``dist_ast.train.build_trainer`` from a composed config with ``data=synthetic``), so
what is timed is what users run. Masks are random at the target sparsities (the state
after the ramp); mask-update steps are skipped, their cost is the ``prune`` benchmark.
The dense baseline is the unconverted model with ``torch.optim.SGD``. Variants run
interleaved (harness.time_interleaved) and the ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import paired_ratios, summarize, time_interleaved
from dist_ast.sparsity.masks import random_masks

log = logging.getLogger("benchmarks.step")

TITLE = "step"

# name -> (model, small_input, image size, num_classes, CPU batch, GPU batch, AST+GC goal)
PRESETS: dict[str, tuple[str, bool, int, int, int, int, float]] = {
    "r18_32": ("resnet18", True, 32, 10, 128, 128, 1.03),
    "r50_224": ("resnet50", False, 224, 1000, 8, 128, 1.02),
}
VARIANTS = ("dense", "ast", "ast_gc", "joint")
NOTES = (
    "Times are seconds per training step (median ± half the interquartile range over "
    "interleaved rounds); ratios are medians of per-round ratios to dense, measured side by "
    "side in one process. `wall` is elapsed time, `cpu` the process CPU time (less sensitive "
    "to other jobs on a shared machine). Joint/AST goal: ≥ 0.97·N."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=0, help="0: the preset's (CPU or GPU)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--inner", type=int, default=1, help="steps per timed sample")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_trainer_variant(
    variant: str,
    *,
    model: str,
    small_input: bool,
    image_size: int,
    num_classes: int,
    batch_size: int,
    sparsities: list[float],
    device: torch.device,
    precision: str,
    channels_last: bool,
    run_dir: str,
) -> Any:
    """A Trainer as ``python -m dist_ast.train`` would build it for this variant."""
    from dist_ast.cli import compose_config
    from dist_ast.distributed.setup import init_distributed
    from dist_ast.train import build_trainer

    ast = {"ast": "ast=ast", "ast_gc": "ast=ast_gc", "joint": "ast=joint"}[variant]
    sp = "[" + ",".join(str(s) for s in sparsities) + "]"
    cfg = compose_config(
        [
            f"model={model}",
            f"model.small_input={str(small_input).lower()}",
            f"model.num_classes={num_classes}",
            "data=synthetic",
            f"data.image_size={image_size}",
            f"data.synthetic_size={2 * batch_size}",
            ast,
            f"ast.sparsities={sp}",
            "ast.ramp_end_epoch=1",
            "ast.update_every=1000",
            "ast.stagger=100",
            "train.max_steps=1000000",
            f"train.batch_size={batch_size}",
            f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.device={device.type}",
            "train.progress=false",
            f"run_dir={run_dir}",
        ]
    )
    trainer = build_trainer(cfg, init_distributed(device.type))
    g = torch.Generator().manual_seed(0)
    for k, s in enumerate(sparsities):  # exact random masks at s_k: the state after the ramp
        trainer.model.set_masks(k, random_masks(trainer.model.sparse_weights(), 1.0 - s, g))
    trainer.model.train()
    return trainer


def trainer_step_fn(trainer: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One ``train_step`` per call; steps with a scheduled mask update are skipped."""

    def step() -> None:
        while trainer.schedule.updates_at(trainer.step):
            trainer.step += 1
        trainer.train_step(x, y)
        trainer.step += 1

    return step


def dense_step_fn(
    model_name: str,
    *,
    small_input: bool,
    num_classes: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float = 5e-4,
) -> Callable[[], None]:
    """Plain dense training of the unconverted torchvision model with torch.optim.SGD."""
    from dist_ast.config import ModelConfig
    from dist_ast.models import build_model

    torch.manual_seed(0)
    net = build_model(
        ModelConfig(name=model_name, num_classes=num_classes, small_input=small_input)
    ).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=0.01,
        momentum=0.9,
    )
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())  # the trainer reads the loss each step too

    return step


def bench_preset(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, small, size, classes, cpu_batch, gpu_batch, goal = PRESETS[name]
    device = _device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (gpu_batch if gpu else cpu_batch)
    precision = args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32")
    channels_last = args.channels_last == "true" or (args.channels_last == "auto" and gpu)
    n = len(args.sparsities)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], None]] = {}
    for v in args.variants:
        if v == "dense":
            fns[v] = dense_step_fn(
                model,
                small_input=small,
                num_classes=classes,
                device=device,
                precision=precision,
                channels_last=channels_last,
                x=x,
                y=y,
            )
        else:
            trainer = build_trainer_variant(
                v,
                model=model,
                small_input=small,
                image_size=size,
                num_classes=classes,
                batch_size=batch,
                sparsities=args.sparsities,
                device=device,
                precision=precision,
                channels_last=channels_last,
                run_dir=f"runs/bench/step/{name}_{v}",
            )
            fns[v] = trainer_step_fn(trainer, x, y)
    log.info("%s: timing %s, %d rounds", name, ", ".join(fns), args.repeats)
    timings = time_interleaved(
        fns,
        repeats=args.repeats,
        warmup=args.warmup,
        inner=args.inner,
        clocks={"wall": time.perf_counter, "cpu": time.process_time},
    )
    setting = f"{model} {size}² b{batch} {precision}{' CL' if channels_last else ''}"
    rows: list[dict[str, Any]] = []

    def row(variant: str, vs: str | None, goal_txt: str = "", ok: bool | None = None) -> dict:
        r: dict[str, Any] = {
            "setting": setting,
            "variant": variant,
            "wall s/step": summarize(timings["wall"][variant]).fmt(3),
            "cpu s/step": summarize(timings["cpu"][variant]).fmt(3),
            "vs": vs or "",
        }
        for c in ("wall", "cpu"):
            pair = {variant: timings[c][variant], vs: timings[c][vs]} if vs else None
            r[f"{c} ratio"] = paired_ratios(pair, vs)[variant].fmt(3) if pair and vs else ""
        r["goal"], r["met"] = goal_txt, ok
        return r

    def median_ratio(a: str, b: str) -> float:
        return paired_ratios({a: timings["wall"][a], b: timings["wall"][b]}, b)[a].median

    base = "dense" if "dense" in fns else None
    for v in fns:
        if v == "ast_gc" and base:
            rows.append(row(v, base, f"≤ {goal}", median_ratio(v, base) <= goal))
        else:
            rows.append(row(v, base if v != base else None))
    if "joint" in fns and "ast" in fns:
        want = 0.97 * n
        rows.append(
            row("joint", "ast", f"≥ {want:.2f} (0.97·N)", median_ratio("joint", "ast") >= want)
        )
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name in args.presets:
        rows += bench_preset(name, args)
    return rows


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["step", *sys.argv[1:]]))
