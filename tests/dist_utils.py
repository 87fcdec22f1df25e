"""Shared helpers of the 2-rank gloo tests (test_distributed_ddp.py,
test_distributed_deepspeed.py, test_distributed_teardown.py): a small CNN trainer, the
global batches, the 1-process reference, and spawning ranks. Not a test module; the
worker functions live here so that spawned processes import them by module name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from dist_ast.config import ASTConfig, EngineConfig, OptimConfig, RunConfig, TrainConfig
from dist_ast.data import Loaders
from dist_ast.distributed.setup import DistInfo, free_port, leave_together
from dist_ast.flops import TrainingFlops
from dist_ast.metrics import MetricsWriter
from dist_ast.sparsity import GradientCorrection, MaskedSGD, SparsitySchedule
from dist_ast.sparsity.model import convert_to_subnets
from dist_ast.sparsity.updater import MaskUpdater

B = 8  # per-rank batch
K = 14  # steps: 3 sub-nets, updates at 2, 3, 4, 6, 7, 8, 10, 11, 12 (several per sub-net)


class SmallNet(nn.Module):
    """Small CNN: dense first conv, GroupNorm (or BatchNorm), two sparse convs, sparse fc."""

    def __init__(self, norm: str = "group") -> None:
        super().__init__()

        def n(c: int) -> nn.Module:
            return nn.GroupNorm(4, c) if norm == "group" else nn.BatchNorm2d(c)

        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.n1 = n(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.n2 = n(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.n3 = n(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.n1(self.conv1(x)))
        x = torch.relu(self.n2(self.conv2(x)))
        x = torch.relu(self.n3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_config(engine: str = "ddp", zero_stage: int = 0, **ast) -> RunConfig:
    a = dict(
        sparsities=[0.5, 0.7, 0.8],
        update_every=4,
        stagger=1,
        ramp_start_epoch=0,
        ramp_end_epoch=1,
        gradient_correction=True,
    )
    a.update(ast)
    return RunConfig(
        ast=ASTConfig(**a),
        optim=OptimConfig(lr=0.2, momentum=0.9, weight_decay=5e-4),
        engine=EngineConfig(name=engine, zero_stage=zero_stage, compact_max_density=1.0),
        train=TrainConfig(batch_size=2 * B, max_steps=K, progress=False),
    )


def make_schedule(config: RunConfig) -> SparsitySchedule:
    a = config.ast
    return SparsitySchedule(
        sparsities=tuple(a.sparsities),
        initial_sparsity=a.initial_sparsity,
        total_steps=K,
        ramp_start=0,
        ramp_end=9,
        update_every=a.update_every,
        stagger=a.stagger,
        update_end=K - 1,
    )


def build(config: RunConfig, dist_info: DistInfo, norm: str, dtype: torch.dtype, tmp: Path):
    """A Trainer around SmallNet, wrapped by the engine of ``config`` (as build_trainer does)."""
    from dist_ast.distributed.ddp import wrap_model
    from dist_ast.train import Trainer

    torch.manual_seed(0)
    model = convert_to_subnets(SmallNet(norm), config.ast.num_subnets, ["conv1"]).to(dtype)
    schedule = make_schedule(config)
    updater = MaskUpdater(model, schedule)
    updater.init_masks(seed=0)
    o = config.optim
    optimizer = MaskedSGD(
        model.param_groups(o.weight_decay), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov
    )
    if config.engine.name == "deepspeed":
        from dist_ast.distributed.deepspeed_engine import wrap_deepspeed

        _, engine, optimizer = wrap_deepspeed(model, optimizer, dist_info, config)
    else:
        _, engine = wrap_model(model, dist_info, config.engine)
    sample = torch.zeros(1, 3, 8, 8, dtype=dtype)
    return Trainer(
        config=config,
        dist=dist_info,
        model=model,
        loaders=Loaders(train=range(100), val=None, num_classes=10, train_size=100),
        optimizer=optimizer,
        schedule=schedule,
        updater=updater,
        gc=GradientCorrection(enabled=config.ast.gradient_correction),
        flops=TrainingFlops.measure(model, sample, batch_size=config.train.batch_size),
        metrics=MetricsWriter(tmp / "metrics.jsonl", enabled=False),
        engine=engine,
    )


def global_batch(
    step: int, dtype: torch.dtype, seed: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(2 * B, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 10, (2 * B,), generator=g)
    return x, y


def train(
    trainer, rank: int, world: int, dtype: torch.dtype, steps: int = K, seed: int = 1000
) -> dict:
    """Run ``steps`` steps on this rank's share of each global batch; return the state."""
    per_step, compact_bytes = [], []
    model = trainer.model
    other = sum(p.numel() for p in model.parameters()) - model.mask_counts(0)[1]
    for _ in range(steps):
        k = trainer.schedule.active_subnet(trainer.step)
        compact_bytes.append((model.mask_counts(k)[0] + other) * 8)  # float64 elements
        x, y = global_batch(trainer.step, dtype, seed)
        n = len(x) // world
        out = trainer.train_step(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        trainer.step += 1
        per_step.append(out)
    model = trainer.model
    return {
        "params": {k: v.detach().double().clone() for k, v in model.named_parameters()},
        "buffers": {
            k: v.detach().clone() for k, v in model.named_buffers() if not k.endswith("masks")
        },
        "masks": [[m.clone() for m in model.masks(k)] for k in range(model.num_subnets)],
        "gc_checked": trainer.gc.steps_checked,
        "gc_conflicts": trainer.gc.conflicts,
        "conflict_steps": [bool(o["gc_conflict"]) for o in per_step],
        "mask_updates": list(trainer.mask_updates),
        "comm_bytes": [o.get("comm_bytes") for o in per_step],
        "compact_bytes": compact_bytes,
    }


def spawn(fn, *args, world: int = 2, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` gloo processes; fail on timeout."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"distributed workers hung (> {timeout}s)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"


def init(rank: int, world: int, port: int) -> DistInfo:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, rank, torch.device("cpu"))


def _train_worker(rank, world, port, out: str, engine: str, stages, norm: str, dtype_name: str):

    info = init(rank, world, port)
    with leave_together():
        _train_part(rank, world, info, out, engine, stages, norm, dtype_name)


def _train_part(rank, world, info, out: str, engine: str, stages, norm: str, dtype_name: str):
    dtype = getattr(torch, dtype_name)
    for stage in stages:
        config = make_config(engine, stage)
        trainer = build(config, info, norm, dtype, Path(out))
        state = train(trainer, rank, world, dtype)
        ds_engine = getattr(
            trainer.engine, "engine", None
        )  # DeepSpeed's own, under engine=deepspeed
        state["wrapper"] = type(getattr(ds_engine, "optimizer", None)).__name__
        state["partitioned"] = getattr(trainer.optimizer, "partitioned", None)
        torch.save(state, Path(out) / f"{engine}{norm}{stage}_rank{rank}.pt")


def reference(norm: str, dtype: torch.dtype, tmp: Path, seed: int = 1000) -> dict:
    """One process, global batch 2B, engine=ddp (a plain model)."""
    config = make_config("ddp")
    trainer = build(config, DistInfo(0, 1, 0, torch.device("cpu")), norm, dtype, tmp)
    return train(trainer, 0, 1, dtype, seed=seed)


def relative_distance(a: dict, b: dict) -> float:
    num = sum(((a["params"][n] - p) ** 2).sum() for n, p in b["params"].items())
    den = sum((p**2).sum() for p in b["params"].values())
    return float(num.sqrt() / den.sqrt())


def mask_agreement(a: dict, b: dict) -> float:
    same = total = 0
    for mg, mr in zip(a["masks"], b["masks"], strict=True):
        for x, y in zip(mg, mr, strict=True):
            same += int((x == y).sum())
            total += x.numel()
    return same / total


def assert_same_run(got: dict, ref: dict, atol: float) -> None:
    assert got["mask_updates"] == ref["mask_updates"]
    for k, (mg, mr) in enumerate(zip(got["masks"], ref["masks"], strict=True)):
        for i, (a, b) in enumerate(zip(mg, mr, strict=True)):
            assert torch.equal(a, b), f"sub-net {k}, layer {i}: masks differ"
    assert got["gc_checked"] == ref["gc_checked"]
    assert got["conflict_steps"] == ref["conflict_steps"]
    for name, p in ref["params"].items():
        diff = (got["params"][name] - p).abs().max().item()
        assert diff <= atol, f"{name}: max |Δ| {diff:.3g} > {atol}"
