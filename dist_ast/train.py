"""Train N sparse sub-nets of one model in one run (AST), or the joint / individual
baselines.

    python -m dist_ast.train experiment=demo run_dir=runs/demo
    torchrun --nproc_per_node=2 -m dist_ast.train experiment=demo run_dir=runs/demo2

The step reads top to bottom: choose the sub-net, forward/backward, mask the gradient,
correct it (GC), masked SGD step, and on scheduled steps prune-and-regrow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_ast.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_resume,
    complete_checkpoints,
    dcp_state,
    deepspeed_part,
    load_files,
    read_checkpoint,
)
from dist_ast.cli import hydra_main
from dist_ast.config import ConfigError, RunConfig, config_as_dict
from dist_ast.data import Loaders, build_loaders
from dist_ast.distributed.ddp import wrap_model
from dist_ast.distributed.engine import Engine
from dist_ast.distributed.mask_sync import broadcast_masks, verify_masks
from dist_ast.distributed.setup import DistInfo, init_distributed, leave_together
from dist_ast.evaluate import evaluate_subnets
from dist_ast.flops import TrainingFlops
from dist_ast.metrics import MetricsWriter, print_summary_table, truncate_metrics
from dist_ast.models import build_subnet_model
from dist_ast.nonfinite import NonFiniteGuard, nonfinite
from dist_ast.preemption import Preempted, PreemptionHandler, agree
from dist_ast.progress import training_progress
from dist_ast.sparsity import GradientCorrection, MaskedSGD, SparsitySchedule, SubnetModel
from dist_ast.sparsity.updater import MaskUpdater
from dist_ast.state_codecs import (
    IntAttrs,
    IntState,
    MaskUpdateLog,
    OptimizerState,
    RankState,
    RngState,
    ScalerState,
    StateMismatchError,
)
from dist_ast.subnets_io import MODEL_FILE, save_model_state

log = logging.getLogger("dist_ast.train")


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``peak``, then cosine to zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_schedule(config: RunConfig, steps_per_epoch: int) -> SparsitySchedule:
    """Resolve the epoch-valued keys to global steps and check the plan can hit s_k."""
    a, t = config.ast, config.train
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    ramp_start = round(a.ramp_start_epoch * steps_per_epoch)
    ramp_end = round(a.ramp_end_epoch * steps_per_epoch)
    update_end = (
        total if a.update_end_epoch is None else round(a.update_end_epoch * steps_per_epoch)
    )
    schedule = SparsitySchedule(
        sparsities=tuple(a.sparsities),
        initial_sparsity=a.initial_sparsity,
        total_steps=total,
        ramp_start=ramp_start,
        ramp_end=ramp_end,
        update_every=a.update_every,
        stagger=a.stagger,
        update_end=min(update_end, total),
        regrow_initial=a.regrow_fraction,
        regrow_min=a.regrow_fraction_min,
        alternating=a.mode != "joint",
    )
    for k in range(schedule.num_subnets):
        last = schedule.last_update_step(k)
        if last is None or last < ramp_end:
            raise ConfigError(
                f"invalid ast.ramp_end_epoch={a.ramp_end_epoch}: sub-net {k} has no mask update "
                f"at or after the ramp end (step {ramp_end}; last update {last}; {total} steps "
                "in all), so it would never reach its target sparsity. Lower ast.ramp_end_epoch "
                "or ast.update_every, or train longer"
            )
    return schedule


@dataclass
class Trainer:
    """Owns everything a step touches; ``state_dict`` is what a checkpoint saves."""

    config: RunConfig
    dist: DistInfo
    model: SubnetModel
    loaders: Loaders
    optimizer: MaskedSGD
    schedule: SparsitySchedule
    updater: MaskUpdater
    gc: GradientCorrection
    flops: TrainingFlops
    metrics: MetricsWriter
    step: int = 0
    scaler: torch.amp.GradScaler | None = None
    mask_updates: list[dict] = field(default_factory=list)
    engine: Engine | None = None  # DDPEngine or DeepSpeedEngine, set by build_trainer
    guard: NonFiniteGuard | None = None  # train.nonfinite, set by build_trainer

    def __post_init__(self) -> None:
        if self.guard is None:
            t = self.config.train
            self.guard = NonFiniteGuard(t.nonfinite, t.max_skipped, self.dist.device)
        if self.engine is not None:
            self.engine.bind(self.optimizer, self.scaler)  # DDP steps them (DeepSpeed: its own)

    @property
    def mode(self) -> str:
        return self.config.ast.mode

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.config.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def forward_backward(self, subnets: list[int], x: torch.Tensor, y: torch.Tensor):
        """Each sub-net's loss, backpropagated through the engine; their mean, detached and
        on the device (reading it each step would stall a GPU: log steps read it)."""
        loss: torch.Tensor | float = 0.0
        for k in subnets:
            self.model.set_subnet(k)
            with self.autocast():
                logits = self.engine.forward(x)
                loss_k = F.cross_entropy(
                    logits.float(), y, label_smoothing=self.config.optim.label_smoothing
                )
            self.engine.backward(loss_k)
            loss = loss + loss_k.detach().double()  # summed as floats were
        return loss / len(subnets)

    def choose_subnets(self) -> list[int]:
        """All sub-nets (joint), or the one the schedule trains at this step."""
        if self.mode == "joint":
            return list(range(self.model.num_subnets))
        return [self.schedule.active_subnet(self.step)]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One step, for every mode and engine; reads nothing back from the device except
        GradScaler's skip check (DESIGN §2): the loss and GC's conflict flag come back as
        device tensors."""
        step = self.step
        lr = self.set_lr()
        updating = self.schedule.updates_at(step)
        skipping = self.config.train.nonfinite == "skip"
        bn_state = [b.clone() for b in self.bn_buffers] if skipping else None
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.begin_step(updating)  # DDP's all-reduce sends only m_k unless k regrows

        subnets = self.choose_subnets()  # 1. one sub-net (alternating) or all (joint)
        loss = self.forward_backward(subnets, x, y)  # 2.
        # 3.-6. mask, non-finite check, GC, masked update: on the gradients as the engine
        # sees them (DDP: the model's; DeepSpeed: flat fp32 partitions, inside its step)
        ran, conflicted = self.engine.step(lambda g: self.update(g, step, subnets, loss))
        if not ran:  # DeepSpeed skipped its step (fp16 overflow): the loss still counts
            self.guard.observe(step, subnets[0], loss, nonfinite(loss, []))
        self.flops.add_step(subnets)  # rule 11: this step's passes at the masks they ran
        if conflicted is None:  # train.nonfinite=skip dropped this step
            torch._foreach_copy_(self.bn_buffers, bn_state)  # the forward's statistics too
            self.optimizer.zero_grad(set_to_none=True)
            log.warning(
                "step %d (sub-net %d): non-finite loss or gradient, skipped", step, subnets[0]
            )
            return self.step_record(loss, lr, subnets, None, False) | {"skipped": True}
        self.engine.end_step()  # BatchNorm running statistics averaged over ranks

        # 7. Prune-and-regrow of the sub-net(s) scheduled at this step.
        if updating:  # prune-and-regrow never ranks NaN scores
            self.check_finite()
        for k in updating:
            self.regrow(k, step, self.engine.dense_grads(subnets, k))
        if updating:
            self.flops.refresh(self.model)  # the cost of the next steps
        return self.step_record(loss, lr, subnets, updating or None, conflicted)

    def update(self, g, step: int, subnets: list[int], loss: torch.Tensor):  # noqa: ANN001
        """Steps 3-6 on ``g`` (a StepGrads); returns GC's conflict flag, None if dropped."""
        g.mask(subnets)  # 3. g = Σ_k m_k ⊙ g_k, unscaled
        # 4. Non-finite loss or (all-reduced) gradient: remembered on the device (stop), or
        # this step is dropped (skip). Under a GradScaler its own skip covers the gradients.
        bad = self.agree_flag(nonfinite(loss, g.checked()))
        if self.config.train.nonfinite == "skip" and self.guard.skip(step, subnets[0], loss, bad):
            return None
        self.guard.observe(step, subnets[0], loss, bad)
        conflicted = self.correct(g, step, subnets)  # 5. GC
        g.step(subnets)  # 6. masked update: only the trained sub-nets' weights and BN rows
        return conflicted

    def correct(self, g, step: int, subnets: list[int]) -> torch.Tensor | bool:  # noqa: ANN001
        """Gradient correction on the sparse weights' gradient (fp32, unscaled), in place,
        branch-free on the device; its conflict flag (False when nothing is compared)."""
        sparse = g.sparse(subnets[0]) if self.checks_conflicts else None
        if sparse is None:  # or this DeepSpeed call steps a group without sparse weights
            return False
        group_start = self.schedule.is_group_start(step)
        _, conflicted = self.gc(*sparse, group_start, reduce_group=g.reduce_group, finite=g.finite)
        return conflicted

    def regrow(self, k: int, step: int, dense: list[torch.Tensor] | None) -> None:
        """Sub-net k's prune-and-regrow: rank 0 decides, the masks are broadcast bit-packed
        and checksummed on every rank. Without a usable gradient (a step the GradScaler or
        DeepSpeed skipped for inf/nan) the update only prunes."""
        if dense is None:
            log.warning("step %d skipped (overflow): sub-net %d only prunes", step, k)
        new = self.updater.decide(k, step, dense) if self.dist.is_main else None
        if self.dist.distributed:
            new = broadcast_masks(new, self.model.masks(k))
        assert new is not None
        reset = self.updater.apply(k, new, self.optimizer)
        self.engine.masks_changed(k)
        if self.dist.distributed:
            verify_masks(self.model)
        self.mask_updates.append({"step": step, "subnet": k, "reset": reset})
        log.debug("step %d: sub-net %d mask update (%d weights grown fresh)", step, k, reset)

    def set_lr(self) -> float:
        """The step's lr (optim.lr_per=epoch: its value at the epoch's first step)."""
        step = self.step
        if self.config.optim.lr_per == "epoch":
            step -= step % len(self.loaders.train)
        lr = lr_at(
            step,
            peak=self.peak_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.schedule.total_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step_record(self, loss, lr: float, subnets, mask_update, conflicted) -> dict:  # noqa: ANN001
        return {
            "loss": loss,  # device tensor: log steps read it
            "lr": lr,
            "subnet": subnets[0] if len(subnets) == 1 else None,
            "mask_update": mask_update,
            "gc_conflict": conflicted,
            "comm_bytes": self.engine.step_bytes,
        }

    @property
    def bn_buffers(self) -> list[torch.Tensor]:
        """BatchNorm running statistics and counters (what a forward in train mode moves)."""
        return [b for name, b in self.model.named_buffers() if not name.endswith("masks")]

    def agree_flag(self, flag: torch.Tensor) -> torch.Tensor:
        """A device bool that is the same on every rank (OR over ranks under skip, whose
        per-step decision must agree; stop agrees when it reads, in check_finite)."""
        if self.dist.distributed and self.config.train.nonfinite == "skip":
            flag = flag.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag = flag.bool()
        return flag

    def check_finite(self) -> None:
        """Stop (NonFiniteError, exit 5) if a step since the start was not finite: called
        on log steps, before a checkpoint or a mask update, and at the end."""
        if self.dist.distributed:
            seen = (self.guard.first[:1] >= 0).to(torch.int32)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            if int(seen) and self.guard.first[0] < 0:  # only another rank saw it
                self.guard.first.copy_(torch.tensor([self.step, -1.0, math.nan]))
        found = complete_checkpoints(self.config.run_dir)
        self.guard.check(str(found[-1][1]) if found else "none (the run saved none yet)")

    @property
    def checks_conflicts(self) -> bool:
        """Whether steps compare g with the previous direction (GC, or counting only)."""
        ast = self.config.ast
        return (
            self.mode != "joint"
            and self.model.num_subnets > 1
            and (ast.gradient_correction or ast.count_conflicts)
        )

    @property
    def peak_lr(self) -> float:
        o = self.config.optim
        scale = self.config.train.batch_size / o.lr_reference_batch if o.lr_reference_batch else 1.0
        return o.lr * scale

    @property
    def warmup_steps(self) -> int:
        return round(self.config.optim.warmup_epochs * len(self.loaders.train))

    def evaluate(self) -> list[dict]:
        return evaluate_subnets(self.model, self.loaders.val, self.dist, autocast=self.autocast)

    def fit(self) -> dict:
        cfg = self.config.train
        total = self.schedule.total_steps
        # train.stop_after_steps: the first N steps of the unchanged schedule, then stop.
        stop = min(total, cfg.stop_after_steps or total)
        batches = iter(self.loaders.train)
        checkpointer = Checkpointer(self)
        preemption = PreemptionHandler()
        try:
            with training_progress(stop, enabled=cfg.progress and self.dist.is_main) as progress:
                progress.advance_to(self.step)
                while self.step < stop:
                    self.model.train()
                    x, y = next(batches)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out = self.train_step(x, y)
                    self.step += 1
                    progress.update(self.step, out)
                    if self.step % cfg.log_every == 0 or out["mask_update"] or self.step == stop:
                        self.log_metrics(out)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < stop:
                        self.log_eval(self.evaluate())
                    self.step_boundary(checkpointer, preemption)
            self.check_finite()
            ckpt = self.config.checkpoint
            saves = ckpt.every_steps or ckpt.every_minutes
            if stop < total and saves and checkpointer.last_saved_step != self.step:
                checkpointer.save(block=True)  # the same command without the stop resumes here
            checkpointer.wait()
        finally:
            preemption.restore()
        results = self.evaluate() if cfg.final_eval else []
        if results:
            self.log_eval(results)
        return self.summary(results)

    def step_boundary(self, checkpointer, preemption) -> None:  # noqa: ANN001
        """Between two steps: save when a trigger fires; on a signal (agreed by all ranks
        in one all-reduce) save this step on every rank and exit with the requeue code."""
        checkpointer.finish_pending(wait=False)
        # on a CPU tensor (the CPU backend beside NCCL): no round trip to the GPU per step
        stop, timed = agree([preemption.requested, checkpointer.minutes_due])
        if stop or timed or checkpointer.steps_due(self.step):
            self.check_finite()  # never save non-finite weights
        if stop:
            checkpointer.save(block=True)
            err = Preempted(self.step, preemption.signum)
            log.warning("%s", err)
            raise err
        if timed or checkpointer.steps_due(self.step):
            checkpointer.save()

    def stateful_parts(self) -> dict:
        """Every part of the state a step touches, by checkpoint key (tensors only): all
        the checkpoint manager knows of the trainer."""
        r = self.dist.rank
        parts = {
            "model": self.model,  # weights, BatchNorm sets, the masks of all sub-nets
            "optim": OptimizerState(self.model, self.optimizer),
            "clock": IntAttrs(
                lambda: {"step": self.step}, lambda c: setattr(self, "step", c["step"])
            ),
            "gc": self.gc,
            "flops": self.flops,
            "mask_updates": MaskUpdateLog(self.mask_updates),
            f"rank{r}": RankState(  # rank-local: this process's RNGs and loader position
                {"rng": RngState(self.dist.device), "loader": IntState(self.loaders.train)}
            ),
            "nonfinite": self.guard,
        }
        if self.scaler is not None:
            parts["scaler"] = ScalerState(self.scaler)
        # engine=deepspeed: the DeepSpeed engine's own files beside the tensors
        ds = deepspeed_part(getattr(self.engine, "engine", None))
        if ds is not None:
            parts["deepspeed"] = ds
        return parts

    def state_dict(self) -> dict:
        """Everything a step touches, as DCP's nested dict of tensors."""
        return dcp_state(self.stateful_parts())

    def load_state_dict(self, state: dict) -> None:
        """Install ``state`` (a part it lacks keeps its state). Without this rank's loader
        position (another world size) it follows from the step: the global batch, so the
        batches per epoch, are the same."""
        for key, part in self.stateful_parts().items():
            if key in state:
                part.load_state_dict(state[key])
        self.flops.refresh(self.model)
        mine = state.get(f"rank{self.dist.rank}", {})
        if "rng" not in mine:
            log.warning(
                "the checkpoint has no RNG state for rank %d (saved with fewer ranks): this "
                "rank keeps its seeded RNG",
                self.dist.rank,
            )
        if "loader" not in mine:
            loader, n = self.loaders.train, len(self.loaders.train)
            steps = {"epoch": self.step // n, "batches_consumed": self.step % n}
            loader.load_state_dict({**loader.state_dict(), **steps})
            log.info("loader position from step %d for %d ranks", self.step, self.dist.world_size)

    def resume_from(self, path: str | Path) -> dict:
        """Restore from a ``step-<N>`` checkpoint folder; returns its meta.json."""
        path = Path(path)
        parts = self.stateful_parts()
        state, meta = read_checkpoint(path, parts, self.config, self.dist)
        if int(meta["world_size"]) != self.dist.world_size:  # rank-local positions
            state.get(f"rank{self.dist.rank}", {}).pop("loader", None)
        try:
            self.load_state_dict(state)
        except StateMismatchError as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from e
        load_files(parts, path)
        log.info("resumed from %s (step %d)", path, self.step)
        return meta

    def log_metrics(self, out: dict) -> None:
        """One metrics.jsonl record. The loss is read from the device here, and only here;
        it is written back into ``out`` as a float for the progress bar."""
        self.check_finite()
        out["loss"] = float(out["loss"])
        record = {
            "step": self.step,
            "subnet": out["subnet"],
            "loss": out["loss"],
            "lr": out["lr"],
            "sparsity": [self.model.sparsity(k) for k in range(self.model.num_subnets)],
            "gc_checked": self.gc.steps_checked,
            "gc_conflicts": self.gc.conflicts,
            "train_flops": self.flops.total,
        }
        if out["mask_update"]:
            record["mask_update"] = out["mask_update"]
        if out.get("comm_bytes") is not None:
            record["comm_bytes"] = out["comm_bytes"]
        if self.config.train.nonfinite == "skip":  # steps dropped for a non-finite loss/grad
            record["skipped_steps"] = self.guard.skipped
        stats = getattr(self.loaders.train, "stats", None)
        if stats is not None:  # corrupt samples skipped by the shard loader (docs/data.md)
            record["bad_samples"] = stats()["bad_samples"]
        self.metrics.write(record)

    def log_eval(self, results: list[dict]) -> None:
        self.metrics.write({"step": self.step, "eval": results})

    def summary(self, results: list[dict]) -> dict:
        subnets = []
        evaluated = {r["index"]: r for r in results}  # empty with train.final_eval=false
        for k in range(self.model.num_subnets):
            r = evaluated.get(k, {})
            nonzero, total = self.model.mask_counts(k)
            subnets.append(
                {
                    "index": k,
                    "target_sparsity": self.config.ast.sparsities[k],
                    "sparsity": 1.0 - nonzero / total,
                    "nonzero": nonzero,
                    "total": total,
                    "top1": r.get("top1"),
                    "top5": r.get("top5"),
                }
            )
        return {
            "steps": self.step,
            "total_steps": self.schedule.total_steps,
            "world_size": self.dist.world_size,
            "mode": self.mode,
            "gradient_correction": self.config.ast.gradient_correction,
            "mask_relation": self.config.ast.mask_relation,
            "gc_checked": self.gc.steps_checked,
            "gc_conflicts": self.gc.conflicts,
            "train_flops": self.flops.total,
            "train_flops_individual": self.flops.individual,
            "subnets": subnets,
        }


def build_trainer(config: RunConfig, dist_info: DistInfo) -> Trainer:
    t = config.train
    torch.manual_seed(t.seed)
    if t.batch_size % dist_info.world_size:
        raise ConfigError(
            f"invalid train.batch_size={t.batch_size}: the global batch must divide evenly over "
            f"{dist_info.world_size} ranks"
        )
    loaders = build_loaders(
        config.data,
        batch_size=t.batch_size // dist_info.world_size,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=t.seed,
        device=dist_info.device,
    )
    if loaders.num_classes != config.model.num_classes:
        raise ConfigError(
            f"invalid model.num_classes={config.model.num_classes}: data={config.data.name} has "
            f"{loaders.num_classes} classes"
        )
    model = build_subnet_model(config.model, config.ast.num_subnets).to(dist_info.device)
    if t.channels_last and config.engine.name == "ddp":
        # NHWC weights and masks. DeepSpeed keeps its parameters as views of flat
        # (row-major) buffers and broadcasts them as bytes, which NHWC strides break:
        # there only the inputs go channels_last and the conv kernels convert the weights.
        model = model.to_channels_last()
    schedule = build_schedule(config, len(loaders.train))
    updater = MaskUpdater(
        model,
        schedule,
        config.ast.mask_relation == "completely_subset",
        nm_patterns=config.ast.nm_patterns,
        regrow_init=config.ast.regrow_init,
        prune_scope=config.ast.prune_scope,
        inactive_weights=config.optim.inactive_weights,
    )
    updater.init_masks(seed=t.seed)
    o = config.optim
    model.set_update_rules(o.inactive_weights, o.batchnorm_weight_decay)  # both engines
    optimizer = MaskedSGD(
        model.param_groups(o.weight_decay), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov
    )
    if config.engine.name == "deepspeed":  # its optimizer steps flat fp32 partitions
        # imported here: `deepspeed` is an optional extra and slow to import
        from dist_ast.distributed.deepspeed_engine import wrap_deepspeed

        _, engine, optimizer = wrap_deepspeed(model, optimizer, dist_info, config)
    else:
        _, engine = wrap_model(model, dist_info, config.engine)
    run_dir = Path(config.run_dir)
    # DeepSpeed bf16/fp16 casts the model itself: measure FLOPs with an input of its dtype.
    sample = next(iter(loaders.val))[0][:1].to(next(model.parameters()).dtype)
    return Trainer(
        config=config,
        dist=dist_info,
        model=model,
        loaders=loaders,
        optimizer=optimizer,
        schedule=schedule,
        updater=updater,
        gc=GradientCorrection(enabled=config.ast.gradient_correction),
        flops=TrainingFlops.measure(model, sample, batch_size=t.batch_size),
        metrics=MetricsWriter(
            run_dir / "metrics.jsonl", enabled=dist_info.is_main, tensorboard=t.tensorboard
        ),
        scaler=torch.amp.GradScaler(dist_info.device.type)
        if t.precision == "fp16" and config.engine.name == "ddp"
        else None,
        engine=engine,
    )


def run(config: RunConfig) -> dict:
    """Train, evaluate every sub-net, write ``summary.json``; returns the summary."""
    dist_info = init_distributed(config.train.device, config.train.collective_timeout_minutes)
    with leave_together(agreed=(Preempted,)):
        run_dir = Path(config.run_dir)
        resume = check_resume(config)  # a bad checkpoint fails here, before any write
        trainer = build_trainer(config, dist_info)
        if resume is not None:
            trainer.resume_from(resume)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(config_as_dict(config), indent=2))
            if resume is not None:  # drop records the killed run wrote after its checkpoint
                truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
                trainer.metrics.purge_step = trainer.step + 1  # and hide them in TensorBoard
        start = time.perf_counter()
        summary = trainer.fit()
        trainer.metrics.close()
        summary["wall_seconds"] = round(time.perf_counter() - start, 3)
        if dist_info.is_main:
            tmp = run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(run_dir / "summary.json")
            # The trained sub-nets for evaluate/export/dynamic/report (dist_ast.subnets_io).
            save_model_state(run_dir / MODEL_FILE, config_as_dict(config), trainer.model)
            print_summary_table(summary)
        del trainer  # freed by destroy_distributed's gc, while the process group is alive
        return summary


def main() -> None:
    """Hydra entry point: ``python -m dist_ast.train experiment=<name> key=value …``."""
    hydra_main(run, config_name="config")


if __name__ == "__main__":
    sys.exit(main())
