"""Metrics to files (``metrics.jsonl``) and the summary table on stdout, rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, named for TensorBoard: ``train/loss``,
    ``sparsity/subnet_k``, ``eval/top1/subnet_k``, ``gc/conflict_fraction`` …"""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "subnet", "mask_update"):
            continue
        if key == "eval" and isinstance(value, list):
            for r in value:
                for metric in ("top1", "top5"):
                    if metric in r:
                        out[f"eval/{metric}/subnet_{r['index']}"] = float(r[metric])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{key}/subnet_{i}"] = float(v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"train/{key}"] = float(value)
    if record.get("gc_checked"):
        out["gc/conflict_fraction"] = record["gc_conflicts"] / record["gc_checked"]
    return out


class MetricsWriter:
    """Appends one JSON object per line, flushed at once so a killed run keeps its log;
    with ``tensorboard`` also to ``<run_dir>/tb``. Other ranks than 0 build it disabled."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        self._tb = None
        self._tb_dir: Path | None = None
        self.purge_step: int | None = None  # resume: TensorBoard hides events from here on
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
                except ImportError as e:  # tensorboard is a dependency; say so if missing
                    log.warning("TensorBoard scalars off: %s (pip install tensorboard)", e)
                else:
                    # opened at the first record: a run that fails before training (say, on
                    # a corrupted checkpoint) leaves no event file behind
                    self._tb_dir = self.path.parent / "tb"

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None and self._tb_dir is not None and "step" in record:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=self.purge_step)
        if self._tb is not None and "step" in record:
            for name, value in tensorboard_scalars(record).items():
                self._tb.add_scalar(name, value, global_step=record["step"])
            self._tb.flush()

    def close(self) -> None:
        self._tb_dir = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics.jsonl records after ``step`` (the killed run's tail, which the resumed
    run writes again); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut by kill -9
            dropped += 1
            continue
        if rec_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in keep))
        tmp.replace(path)
        log.info("metrics.jsonl: dropped %d records after step %d", dropped, step)
    return dropped


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"  # "-": not evaluated


def print_summary_table(summary: dict, console: Console | None = None) -> None:
    steps = summary["steps"]
    if summary.get("total_steps", steps) != steps:  # train.stop_after_steps
        steps = f"{steps} of {summary['total_steps']}"
    table = Table(
        title=f"dist_ast: {summary['mode']} · {steps} steps · world size {summary['world_size']}"
    )
    for col in ("sub-net", "target sparsity", "measured sparsity", "nonzero", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for s in summary["subnets"]:
        table.add_row(
            str(s["index"]),
            f"{s['target_sparsity']:.4f}",
            f"{s['sparsity']:.4f}",
            f"{s['nonzero']:,}",
            _percent(s["top1"]),
            _percent(s["top5"]),
        )
    console = console or Console()
    console.print(table)
    if summary.get("train_flops_individual"):
        ratio = summary["train_flops"] / summary["train_flops_individual"]
        console.print(
            f"training FLOPs {summary['train_flops']:.3e} = {ratio:.3f}x of training each "
            f"sub-net on its own; GC conflicts {summary['gc_conflicts']}/{summary['gc_checked']} "
            "checked steps"
        )
