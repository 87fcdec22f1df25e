"""Communication benchmark: masked compact all-reduce vs DDP's plain all-reduce.

    python -m benchmarks.comm [--densities 1.0 0.5 0.2 0.1 0.05] [--repeats 5]

Two gloo processes all-reduce ResNet-50's gradients (25.6M fp32 values) in DDP-sized
buckets (25 MB, parameters in reverse order, as DDP assigns them before its rebuild),
once with the built-in all-reduce (divide, all-reduce the whole bucket) and once with
:class:`dist_ast.distributed.comm_hook.MaskedAllReduceState` for a sub-net of each
density (random masks with exact per-layer counts; the first conv, BatchNorm and biases
are dense, as in training). The two are timed alternately in one run, so the ratios are
measured side by side on the same (possibly busy) machine; each side reports its best
repetition (and the ratio of medians). Both sides include the whole hook: packing, the
all-reduce and scattering back. ``--max-density`` defaults to 1.0 here so that every
density is measured compact (training falls back to dense above
``engine.compact_max_density``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.harness import add_model_argument
from dist_ast.distributed.setup import free_port, leave_together
from dist_ast.sparsity.masks import random_masks

log = logging.getLogger(__name__)

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
TITLE = "comm: masked compact all-reduce vs default all-reduce (gloo, 2 processes, ResNet-50)"
NOTES = (
    "Ratios are masked/default, timed alternately in one run (best of --repeats; "
    "time_ratio_median from the medians). bytes = all-reduce payload. Goal: bytes ratio = "
    "density (+ the always-dense first conv, BatchNorm, biases); time ratio <= 0.25 at 0.1. "
    "pack / packed all-reduce / unpack: the hook's three parts timed alone (best of "
    "--repeats), side by side with the rest."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per density")
    add_model_argument(p)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument(
        "--max-density",
        type=float,
        default=1.0,
        help="engine.compact_max_density: above it the hook all-reduces densely",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")


def _buckets(params: list[torch.Tensor], cap_bytes: float) -> list[list[int]]:
    """Greedy buckets over the parameters in reverse order (DDP's initial assignment)."""
    out: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(params))):
        nbytes = params[i].numel() * params[i].element_size()
        if out[-1] and size + nbytes > cap_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with leave_together():
        rows = _bench(rank, args)
        if rank == 0:
            torch.save(rows, out_path)


def _bench(rank: int, args: argparse.Namespace) -> list[dict]:
    from dist_ast.config import ModelConfig
    from dist_ast.distributed.comm_hook import MaskedAllReduceState
    from dist_ast.models import build_subnet_model

    torch.manual_seed(0)
    model = build_subnet_model(ModelConfig(name=args.model, num_classes=1000), 1)
    params = [p for p in model.parameters() if p.requires_grad]
    assignment = _buckets(params, args.bucket_mb * 2**20)
    grads = [torch.randn(sum(params[i].numel() for i in b)) + rank for b in assignment]
    buffers = [g.clone() for g in grads]
    bucket_params = [[params[i] for i in b] for b in assignment]
    state = MaskedAllReduceState(model, max_density=args.max_density)
    ws = dist.get_world_size()

    def refill() -> None:
        for b, g in zip(buffers, grads, strict=True):
            b.copy_(g)

    def default_allreduce() -> None:
        futs = []
        for b in buffers:  # torch.distributed.algorithms.ddp_comm_hooks.default.allreduce_hook
            b.div_(ws)
            futs.append(dist.all_reduce(b, async_op=True).get_future())
        torch.futures.wait_all(futs)

    def masked_allreduce() -> None:
        futs = [
            state.allreduce(i, b, ps)
            for i, (b, ps) in enumerate(zip(buffers, bucket_params, strict=True))
        ]
        torch.futures.wait_all(futs)

    def timed(fn) -> float:
        refill()
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
        return float(elapsed)

    rows = []
    for density in args.densities:
        g = torch.Generator().manual_seed(1)
        model.set_masks(0, random_masks(model.sparse_weights(), density, g, per_layer=True))
        state.masks_changed()
        # Warm-up: builds the index caches (done once per mask update in training).
        state.begin_step()
        masked_allreduce()
        # Correctness on the spot: the compact result equals dense all-reduce then masking.
        refill()
        default_allreduce()
        expect = [b.clone() for b in buffers]
        refill()
        masked_allreduce()
        _check_compact(state, model, buffers, expect, bucket_params, density)
        # The hook's three parts alone, to show where its time goes: the gather and the
        # scatter are memory passes over (most cache lines of) every bucket.
        plans = [
            state.plan(i, b, ps, 0)
            for i, (b, ps) in enumerate(zip(buffers, bucket_params, strict=True))
        ]
        index = [p.index if p.compact else None for p in plans]
        packed = [
            b if i is None else b.index_select(0, i) for b, i in zip(buffers, index, strict=True)
        ]

        def pack_only(index=index) -> None:
            for b, i in zip(buffers, index, strict=True):
                if i is not None:
                    b.index_select(0, i).div_(ws)

        def allreduce_packed_only(packed=packed) -> None:
            futs = [dist.all_reduce(q, async_op=True).get_future() for q in packed]
            torch.futures.wait_all(futs)

        def unpack_only(index=index, packed=packed) -> None:
            for b, i, q in zip(buffers, index, packed, strict=True):
                if i is not None:
                    b.index_copy_(0, i, q)

        t_default, t_masked = [], []
        t_parts: dict[str, list[float]] = {"pack": [], "allreduce": [], "unpack": []}
        for _ in range(args.repeats):
            t_default.append(timed(default_allreduce))
            state.begin_step()
            t_masked.append(timed(masked_allreduce))
            t_parts["pack"].append(timed(pack_only))
            t_parts["allreduce"].append(timed(allreduce_packed_only))
            t_parts["unpack"].append(timed(unpack_only))
        dense_bytes = state.step_dense_bytes
        sent = state.step_bytes
        # Best of the repetitions on each side: on a shared machine the minimum is the
        # least disturbed measurement; the medians are kept in the row as well.
        td, tm = min(t_default), min(t_masked)
        rows.append(
            {
                "density": density,
                "elements": sum(b.numel() for b in buffers),
                "buckets": len(buffers),
                "bytes_default": dense_bytes,
                "bytes_masked": sent,
                "bytes_ratio": sent / dense_bytes,
                "time_default_ms": td * 1e3,
                "time_masked_ms": tm * 1e3,
                "time_ratio": tm / td,
                "time_ratio_median": statistics.median(t_masked) / statistics.median(t_default),
                **{f"{part}_ms": min(t) * 1e3 for part, t in t_parts.items()},
            }
        )
        if rank == 0:
            log.info("density %.2f: %s", density, rows[-1])
    return rows


def _check_compact(state, model, buffers, expect, bucket_params, density: float) -> None:
    """The hook's result must equal the dense all-reduce masked to sub-net 0."""
    layer = {id(w): m for w, m in zip(model.sparse_weights(), model.masks(0), strict=True)}
    for i, (b, e, ps) in enumerate(zip(buffers, expect, bucket_params, strict=True)):
        if state.plan(i, b, ps, 0).compact:
            keep = torch.cat(
                [
                    layer[id(p)].reshape(-1)
                    if id(p) in layer
                    else torch.ones(p.numel(), dtype=torch.bool)
                    for p in ps
                ]
            )
            # Outside m_k the hook leaves the local gradient; the trainer masks it away.
            e = torch.where(keep, e, torch.zeros((), dtype=e.dtype))
            b = torch.where(keep, b, torch.zeros((), dtype=b.dtype))
        if not torch.equal(b, e):
            raise RuntimeError(f"density {density}: bucket {i} differs from dense then masked")


def run(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark on 2 local gloo processes; one row per density."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(
            _worker, args=(2, free_port(), args, out), nprocs=2, join=True, start_method="spawn"
        )
        return torch.load(out)


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["comm", *sys.argv[1:]]))
