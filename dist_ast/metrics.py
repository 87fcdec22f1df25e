"""Metrics to files (``metrics.jsonl``) and the summary table on stdout, rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


class MetricsWriter:
    """Appends one JSON object per line; flushed at once so a killed run keeps its log."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def summary_table(summary: dict) -> Table:
    table = Table(
        title=f"dist_ast: {summary['mode']} · {summary['steps']} steps · "
        f"world size {summary['world_size']}"
    )
    for col in ("sub-net", "target sparsity", "measured sparsity", "nonzero", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for s in summary["subnets"]:
        table.add_row(
            str(s["index"]),
            f"{s['target_sparsity']:.4f}",
            f"{s['sparsity']:.4f}",
            f"{s['nonzero']:,}",
            f"{100 * s['top1']:.2f}%",
            f"{100 * s['top5']:.2f}%",
        )
    return table


def print_summary_table(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    if summary.get("train_flops_individual"):
        ratio = summary["train_flops"] / summary["train_flops_individual"]
        console.print(
            f"training FLOPs {summary['train_flops']:.3e} = {ratio:.3f}x of training each "
            f"sub-net on its own; GC conflicts {summary['gc_conflicts']}/{summary['gc_checked']} "
            "checked steps"
        )
