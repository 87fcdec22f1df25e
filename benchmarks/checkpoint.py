"""Checkpoint save/load time and size: ResNet-50 (ImageNet head) with 3 sub-nets, the
full training state (weights, every BN set, 3 bool masks per sparse layer, momentum, the
GC buffer, RNG and loader state), on 1 and 2 ranks (gloo), synchronous vs asynchronous
DCP saves.

    python -m benchmarks checkpoint            # or python -m benchmarks.checkpoint

"blocking" is the time ``Checkpointer.save`` holds the training loop: for a sync save
the whole write; for an async save the copy of the state to CPU memory (the write runs
in a thread). Goal: async blocking < 10% of the sync save. Sync and async saves run
interleaved, round after round, and the ratio is the median of per-round ratios (the
CPU is shared, so absolute times drift). "load" is ``load_checkpoint`` into a fresh
state, as a resumed run does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.harness import add_model_argument
from dist_ast.distributed.setup import free_port, leave_together
from dist_ast.sparsity.masks import random_masks

TITLE = "checkpoint: DCP save/load of ResNet-50 with 3 sub-nets, sync vs async"
NOTES = (
    "blocking = time the training loop waits in Checkpointer.save; async writes in a "
    "thread after copying the state to CPU memory. ratio = async blocking / sync save, "
    "median of per-round ratios. checksum = rank 0's manifest of a sync save (reading "
    "every file back and its crc32c), included in the sync save time; % = median of "
    "per-round checksum / sync save (goal < 10 %). verify = checking the newest checkpoint "
    "against its manifest, as resume=auto does before loading."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="sync+async saves per world size")
    add_model_argument(p)
    p.add_argument("--subnets", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")


class _Loader:
    """Just the position interface of a training loader."""

    def __init__(self) -> None:
        self.pos = {"epoch": 3, "batches_consumed": 17}

    def __len__(self) -> int:
        return 5000

    def state_dict(self) -> dict[str, int]:
        return dict(self.pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = dict(state)


class _Flops:
    def __init__(self) -> None:
        self.total, self.individual = 3 << 60, 9 << 60

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "individual": self.individual}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.total, self.individual = s["total"], s["individual"]

    def refresh(self, model: object) -> None:
        pass


def _trainer(args: argparse.Namespace, run_dir: Path, rank: int, world: int, async_save: bool):
    """A Trainer-shaped object with a real model, optimizer state and GC buffer."""
    from dist_ast.config import RunConfig
    from dist_ast.distributed.setup import DistInfo
    from dist_ast.models import build_subnet_model
    from dist_ast.sparsity import GradientCorrection, MaskedSGD
    from dist_ast.state_codecs import (
        IntAttrs,
        IntState,
        MaskUpdateLog,
        OptimizerState,
        RankState,
        RngState,
    )

    config = RunConfig(run_dir=str(run_dir))
    config.model.name, config.model.num_classes, config.model.small_input = args.model, 1000, False
    config.ast.sparsities = (
        [0.8, 0.9, 0.95][: args.subnets]
        if args.subnets <= 3
        else [0.5 + 0.45 * i / args.subnets for i in range(args.subnets)]
    )
    config.checkpoint.async_save = async_save
    config.checkpoint.keep = 2
    torch.manual_seed(0)
    model = build_subnet_model(config.model, args.subnets)
    for k in range(args.subnets):  # sparse masks, as after the ramp
        g = torch.Generator().manual_seed(k)
        model.set_masks(k, random_masks(model.sparse_weights(), 0.1, g))
    opt = MaskedSGD(model.param_groups(1e-4), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    gc = GradientCorrection()
    gc.prev = [torch.randn_like(w) for w in model.sparse_weights()]
    t = SimpleNamespace(
        config=config,
        dist=DistInfo(rank, world, rank, torch.device("cpu")),
        model=model,
        step=0,
    )
    # the Trainer's parts (Trainer.stateful_parts), with the same keys and sizes
    parts = {
        "model": model,
        "optim": OptimizerState(model, opt),
        "clock": IntAttrs(lambda: {"step": t.step}, lambda c: setattr(t, "step", c["step"])),
        "gc": gc,
        "flops": IntState(_Flops()),
        "mask_updates": MaskUpdateLog(
            [{"step": 4000 * i, "subnet": i % 3, "reset": 10 * i} for i in range(30)]
        ),
        f"rank{rank}": RankState(
            {"rng": RngState(torch.device("cpu")), "loader": IntState(_Loader())}
        ),
    }
    t.stateful_parts = lambda: parts
    return t


def _load(t: SimpleNamespace, path: Path) -> None:
    """What Trainer.resume_from does: read the parts' state, install it."""
    from dist_ast.checkpoint import read_checkpoint

    parts = t.stateful_parts()
    state, _ = read_checkpoint(path, parts, t.config, t.dist)
    for key, part in parts.items():
        if key in state:
            part.load_state_dict(state[key])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _bench(rank: int, world: int, args: argparse.Namespace, root: Path) -> dict:
    from dist_ast.checkpoint import (
        Checkpointer,
        complete_checkpoints,
        verify_checkpoint,
    )

    torch.set_num_threads(args.threads)
    run_dir = root / f"w{world}"
    sync_t = _trainer(args, run_dir / "sync", rank, world, async_save=False)
    async_t = _trainer(args, run_dir / "async", rank, world, async_save=True)
    ck_sync, ck_async = Checkpointer(sync_t), Checkpointer(async_t)
    blocking = {"sync": [], "async": []}
    total_async: list[float] = []
    checksum: list[float] = []  # rank 0's manifest (read + crc32c of every file) in a sync save
    ratios = []
    for r in range(args.rounds + 1):  # round 0 warms up (threads, allocator, page cache)
        for name in ("sync", "async") if r % 2 else ("async", "sync"):
            t, ck = (sync_t, ck_sync) if name == "sync" else (async_t, ck_async)
            t.step = (r + 1) * 100
            _barrier(world)
            t0 = time.perf_counter()
            ck.save()
            t1 = time.perf_counter()
            if name == "async":
                ck.wait()
                total = time.perf_counter() - t0
                if r:
                    total_async.append(total)
            if r:
                blocking[name].append(t1 - t0)
                if name == "sync":
                    checksum.append(ck.checksum_seconds)
        if r:
            ratios.append(blocking["async"][-1] / blocking["sync"][-1])
    _barrier(world)
    newest = complete_checkpoints(run_dir / "sync")[-1][1]
    size = _dir_bytes(newest)
    # load into a fresh trainer (another seed: every tensor must be overwritten)
    fresh = _trainer(args, run_dir / "sync", rank, world, async_save=False)
    loads = []
    for _ in range(max(1, args.rounds)):
        _barrier(world)
        t0 = time.perf_counter()
        _load(fresh, newest)
        loads.append(time.perf_counter() - t0)
    ok = all(
        torch.equal(a, b)
        for a, b in zip(
            fresh.model.state_dict().values(), sync_t.model.state_dict().values(), strict=True
        )
    )
    med = statistics.median
    checksum_ratio = med([c / s for c, s in zip(checksum, blocking["sync"], strict=True)])
    t0 = time.perf_counter()
    verify_checkpoint(newest)  # what resume=auto adds before loading (rank 0)
    verify_s = time.perf_counter() - t0
    return {
        "ranks": world,
        "state MB": round(size / 1e6, 1),
        "sync save s": round(med(blocking["sync"]), 3),
        "async blocking s": round(med(blocking["async"]), 3),
        "async total s": round(med(total_async), 3),
        "blocking ratio": round(med(ratios), 3),
        "goal < 0.10": med(ratios) < 0.10,
        "checksum s": round(med(checksum), 3),
        "checksum % of save": round(100 * checksum_ratio, 1),
        "checksum goal < 10 %": checksum_ratio < 0.10,
        "verify s": round(verify_s, 3),
        "load s": round(med(loads), 3),
        "load exact": ok,
    }


def _worker(
    rank: int, world: int, port: int, args: argparse.Namespace, root: str, out: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with leave_together():
        row = _bench(rank, world, args, Path(root))
        if rank == 0:
            torch.save(row, out)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per world size."""
    rows = []
    if args.dir:  # --dir names where to write: make it, as the other benches do
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = tempfile.mkdtemp(prefix="dist_ast-ckpt-bench-", dir=args.dir)
    try:
        for world in args.ranks:
            root = Path(base) / f"run{world}"
            if world == 1:
                rows.append(_bench(0, 1, args, root))
                continue
            out = str(Path(base) / f"row{world}.pt")
            mp.start_processes(
                _worker,
                args=(world, free_port(), args, str(root), out),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            rows.append(torch.load(out, weights_only=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["checkpoint", *sys.argv[1:]]))
