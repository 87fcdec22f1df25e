"""One prune-and-regrow update of ResNet-50 with 3 sub-nets: the decision on rank 0
(``MaskUpdater.decide`` on a real dense gradient) against one dense training step, and
the bit-packed mask broadcast to 2 gloo ranks (time and bytes on the wire).

The decision runs once per sub-net every ΔT steps (ImageNet: 4000), so "under one dense
step" means the update costs < 1/4000 of training; the goal here is the issue's.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import add_model_argument, paired_ratios, summarize, time_interleaved
from dist_ast.distributed.setup import free_port, leave_together
from dist_ast.sparsity.masks import random_masks

log = logging.getLogger("benchmarks.prune")

TITLE = "prune"
NOTES = (
    "decide = global magnitude prune + per-layer drop/regrow (exact top-k) of one sub-net "
    "mid-ramp, from the dense gradient of one real forward/backward; ratio = per-round "
    "decide time / dense step time (interleaved). Broadcast: rank 0 packs 1 bit per weight, "
    "gloo broadcast to 2 ranks, unpack, plus the all-gathered checksum check."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8, help="dense step's batch (CPU: small)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--subnet", type=int, default=1, help="which sub-net's update to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-broadcast", action="store_true", help="skip the 2-rank gloo part")


def _broadcast_worker(rank: int, port: int, model_name: str, n: int, reps: int, out: str) -> None:
    import torch.distributed as dist

    from dist_ast.config import ModelConfig
    from dist_ast.distributed.mask_sync import broadcast_masks, verify_masks
    from dist_ast.models import build_subnet_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=_timeout())
    with leave_together():
        model = build_subnet_model(ModelConfig(name=model_name, num_classes=1000), n)
        like = model.masks(0)
        g = torch.Generator().manual_seed(0)
        times, checks = [], []
        for _ in range(reps + 1):
            new = random_masks(like, 0.1, g, per_layer=True) if rank == 0 else None
            dist.barrier()
            t0 = time.perf_counter()
            got = broadcast_masks(new, like)
            model.set_masks(0, got)
            t1 = time.perf_counter()
            verify_masks(model)
            t2 = time.perf_counter()
            times.append(t1 - t0)
            checks.append(t2 - t1)
        if rank == 0:
            nbytes = (sum(m.numel() for m in like) + 7) // 8
            Path(out).write_text(
                f"{nbytes} {statistics.median(times[1:])} {statistics.median(checks[1:])}"
            )


def _timeout():
    import datetime

    return datetime.timedelta(seconds=300)


def time_broadcast(model_name: str, n: int, reps: int) -> tuple[int, float, float] | None:
    """(bytes, seconds for broadcast+install, seconds for the checksum check) or None."""
    try:
        import dist_ast.distributed.mask_sync  # noqa: F401
    except ImportError:
        log.warning("dist_ast.distributed.mask_sync is missing: broadcast not timed")
        return None
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "result")
        ctx = mp.start_processes(
            _broadcast_worker,
            args=(free_port(), model_name, n, reps, out),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 600
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError("mask broadcast benchmark did not finish in 600 s")
        nbytes, t_bcast, t_check = Path(out).read_text().split()
        return int(nbytes), float(t_bcast), float(t_check)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.step import dense_step_fn
    from dist_ast.config import ModelConfig
    from dist_ast.models import build_subnet_model
    from dist_ast.sparsity.schedule import SparsitySchedule
    from dist_ast.sparsity.updater import MaskUpdater

    if args.threads:
        torch.set_num_threads(args.threads)
    n = len(args.sparsities)
    size, batch = args.image_size, args.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)

    model = build_subnet_model(ModelConfig(name=args.model, num_classes=1000), n)
    schedule = SparsitySchedule(
        sparsities=tuple(args.sparsities),
        initial_sparsity=0.0,
        total_steps=100_000,
        ramp_start=0,
        ramp_end=50_000,
        update_every=4000,
        stagger=400,
        update_end=100_000,
    )
    k = args.subnet
    step = schedule.update_step(k, 5 * 4000 + k * 400)  # mid-ramp
    # Masks as they stand one update earlier, so the decision prunes and regrows.
    before = [schedule.target_sparsity(j, step - 4000) for j in range(n)]
    g = torch.Generator().manual_seed(0)
    for j, s in enumerate(before):
        model.set_masks(j, random_masks(model.sparse_weights(), 1.0 - s, g))
    updater = MaskUpdater(model, schedule)
    model.set_subnet(k)
    model.train()
    F.cross_entropy(model(x), y).backward()
    grads = [w.grad.detach().clone() for w in model.sparse_weights()]
    model.zero_grad(set_to_none=True)

    dense = dense_step_fn(
        args.model,
        small_input=False,
        num_classes=1000,
        device=torch.device("cpu"),
        precision="fp32",
        channels_last=False,
        x=x,
        y=y,
    )
    decisions: list[list[torch.Tensor]] = []

    def decide() -> None:
        decisions.append(updater.decide(k, step, grads))

    t = time_interleaved(
        {"dense step": dense, "decide": decide},
        repeats=args.repeats,
        warmup=args.warmup,
        clocks={"wall": time.perf_counter, "cpu": time.process_time},
    )
    target = schedule.target_count(k, step, updater.total)
    nnz = sum(int(m.sum()) for m in decisions[-1])
    assert nnz == target, f"decision has {nnz} live weights, schedule says {target}"
    total = updater.total
    r = {c: paired_ratios(t[c], "dense step")["decide"] for c in t}
    rows: list[dict[str, Any]] = [
        {
            "what": f"dense {args.model} step, b{batch} {size}²",
            "wall s": summarize(t["wall"]["dense step"]).fmt(3),
            "cpu s": summarize(t["cpu"]["dense step"]).fmt(3),
            "wall ratio": "",
            "cpu ratio": "",
            "bytes": None,
            "goal": "",
            "met": None,
        },
        {
            "what": f"decide (sub-net {k}, step {step}, {total:,} sparse weights)",
            "wall s": summarize(t["wall"]["decide"]).fmt(3),
            "cpu s": summarize(t["cpu"]["decide"]).fmt(3),
            "wall ratio": r["wall"].fmt(3),
            "cpu ratio": r["cpu"].fmt(3),
            "bytes": None,
            "goal": "< 1 dense step",
            "met": r["wall"].median < 1.0,
        },
    ]
    if not args.no_broadcast:
        res = time_broadcast(args.model, n, max(3, args.repeats))
        if res is not None:
            nbytes, t_b, t_c = res
            goal = (total + 7) // 8
            rows.append(
                {
                    "what": "broadcast bit-packed masks of 1 sub-net, 2 gloo ranks",
                    "wall s": f"{t_b:.3f}",
                    "cpu s": "",
                    "wall ratio": f"{t_b / summarize(t['wall']['dense step']).median:.3f}",
                    "cpu ratio": "",
                    "bytes": nbytes,
                    "goal": f"params/8 = {goal:,} B",
                    "met": nbytes <= goal,
                }
            )
            rows.append(
                {
                    "what": "checksum check of all masks (all-gather)",
                    "wall s": f"{t_c:.3f}",
                    "cpu s": "",
                    "wall ratio": "",
                    "cpu ratio": "",
                    "bytes": None,
                    "goal": "",
                    "met": None,
                }
            )
    return rows


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["prune", *sys.argv[1:]]))
