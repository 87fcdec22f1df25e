"""The benchmark harness: timing with warm-up and interleaving, statistics, the
machine description, and the results as a rich table and a dated BENCHMARKS.md section.

Why interleave: the CI box and our dev box are shared, so absolute times drift by tens
of percent within a minute. Running the variants in turn (A B C A B C …, the order
rotated every round) and taking the median of the *per-round* ratios cancels most of
that drift; the ratios are what the benchmarks report and what the goals are stated in.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import BENCHMARKS

log = logging.getLogger("benchmarks")

# Relative: the working directory, which is the repository root (``python -m benchmarks``
# runs from there); never derived from this file's location.
DEFAULT_OUTPUT = Path("BENCHMARKS.md")


# -- statistics -----------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements (spread = interquartile range)."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_spread(self) -> float:
        """IQR / median: the noise of this measurement, as a fraction."""
        return self.iqr / self.median if self.median else float("nan")

    def fmt(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} ± {self.iqr / 2:.{digits}f}"


def summarize(samples: Sequence[float]) -> Stats:
    """Median, quartiles (linear interpolation, as numpy's default) and range."""
    if not samples:
        raise ValueError("no samples to summarize")
    xs = sorted(float(s) for s in samples)
    return Stats(
        n=len(xs),
        median=statistics.median(xs),
        q1=_quantile(xs, 0.25),
        q3=_quantile(xs, 0.75),
        min=xs[0],
        max=xs[-1],
    )


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_ratios(samples: Mapping[str, Sequence[float]], baseline: str) -> dict[str, Stats]:
    """Per-round ratio of every variant to ``baseline`` (round i of A over round i of B).

    Pairing by round cancels the machine's drift, which the ratio of two medians does not.
    """
    base = samples[baseline]
    out = {}
    for name, xs in samples.items():
        if len(xs) != len(base):
            raise ValueError(f"{name}: {len(xs)} samples, {baseline}: {len(base)}; pair them")
        out[name] = summarize([a / b for a, b in zip(xs, base, strict=True)])
    return out


# -- timing ---------------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    inner: int = 1,
    sync: Callable[[], None] = _sync,
    clocks: Mapping[str, Callable[[], float]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant, measured in interleaved rounds:
    ``{clock: {variant: [seconds per call, one per round]}}``.

    ``warmup`` untimed calls of each variant first (allocator, caches, lazy init); then
    ``repeats`` rounds, each timing ``inner`` calls of every variant in turn, the order
    rotated by one each round so that no variant always runs right after the same one.
    ``clocks`` defaults to ``{"wall": time.perf_counter}``; ``time.process_time`` as a
    second clock gives CPU time, which other jobs on a shared machine disturb less.
    """
    clocks = dict(clocks or {"wall": time.perf_counter})
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync()
    out: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in clocks}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync()
            t0 = {c: f() for c, f in clocks.items()}
            for _ in range(inner):
                variants[name]()
            sync()
            for c, f in clocks.items():
                out[c][name].append((f() - t0[c]) / inner)
    return out


# -- the machine ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """What a reader needs to judge a number: CPU, cores, load, torch, GPU."""
    import torch

    desc: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        desc["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
        desc["gpus"] = torch.cuda.device_count()
        desc["cuda"] = torch.version.cuda
    else:
        desc["gpu"] = "none"
    return desc


def describe_machine(desc: Mapping[str, Any]) -> str:
    parts = [
        f"CPU {desc.get('cpu')} ({desc.get('cores')} cores, {desc.get('torch_threads')} "
        f"torch threads)"
    ]
    if "load_avg_1m" in desc:
        parts.append(f"load avg {desc['load_avg_1m']}")
    parts.append(f"torch {desc.get('torch')}")
    parts.append(f"GPU {desc.get('gpu')}")
    return ", ".join(parts)


# -- tables -----------------------------------------------------------------------------
def fmt_value(v: Any) -> str:
    """Numbers as people read them: 3 significant decimals, big ints with separators."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.3e}"
        if abs(v) >= 100:
            return f"{v:,.1f}"
        return f"{v:.4g}"
    return str(v)


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every row, in first-seen order."""
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def rich_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title=title)
    cols = columns_of(rows)
    for c in cols:
        table.add_column(c, justify="left" if rows and isinstance(rows[0].get(c), str) else "right")
    for row in rows:
        table.add_row(*(fmt_value(row.get(c)) for c in cols))
    return table


def _md_cell(v: Any) -> str:
    return fmt_value(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of the rows (missing cells left empty)."""
    cols = columns_of(rows)
    if not cols:
        return "_(no rows)_\n"
    lines = [
        "| " + " | ".join(_md_cell(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def markdown_section(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    command: str,
    machine: Mapping[str, Any],
    when: _dt.datetime | None = None,
    notes: str = "",
) -> str:
    when = when or _dt.datetime.now(_dt.timezone.utc)
    out = [
        f"## {name} · {when.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {describe_machine(machine)}.",
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    out.append(markdown_table(rows))
    return "\n".join(out) + "\n"


def append_markdown(path: Path, section: str) -> None:
    """Append one dated section; a new file gets a short header first."""
    path = Path(path)
    if not path.exists():
        path.write_text(
            "# Benchmarks\n\nMade by `python -m benchmarks <name>`; each section is one run, "
            "newest last, with its command and machine.\n\n"
        )
    with path.open("a") as f:
        f.write(section)


# -- the command line ---------------------------------------------------------------------
def add_model_argument(p: argparse.ArgumentParser, *more: str) -> None:
    """``--model`` of the benchmarks that build a sub-net model: the ImageNet ResNets, and
    the small CIFAR resnet20 that keeps a smoke round (tests/test_bench.py) quick."""
    p.add_argument(
        "--model",
        default="resnet50",
        choices=["resnet18", "resnet50", *more, "resnet20"],
        help="resnet20: the small CIFAR model, for a quick smoke round",
    )


def parse_args(
    module: Any, argv: Sequence[str] = (), name: str | None = None
) -> argparse.Namespace:
    """A benchmark's options: the parser its ``add_arguments`` fills, given ``argv``.

    The one contract every benchmark module keeps: ``add_arguments(parser)`` declares its
    options, ``run(args) -> list[dict]`` returns the table's rows (optional: ``TITLE``,
    ``NOTES``, ``last_notes()``, ``exit_code(rows)``). Tests and other code call a bench as
    ``module.run(harness.parse_args(module, [...]))``.
    """
    name = name or module.__name__.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(p)
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks <name> [--no-record] [--output FILE] [benchmark options]``,
    from the repository root (``python -m benchmarks.<name> …`` is the same command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        add_help=False,
        # no prefixes: a benchmark's own --out must not be taken for the harness's --output
        allow_abbrev=False,
        description="Run one benchmark, print its table and append it to BENCHMARKS.md "
        "(in the working directory: run from the repository root). Options after the name "
        "that the harness does not know go to the benchmark "
        "(`python -m benchmarks <name> --help`).",
    )
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="markdown file to append to (default: BENCHMARKS.md in the working directory)",
    )
    p.add_argument("--no-record", action="store_true", help="print only; do not append")
    p.add_argument("--notes", default="", help="a sentence to record with the table")
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    opts, rest = p.parse_known_args(argv)  # "-h" after the name goes to the benchmark
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = importlib.import_module(f"benchmarks.{opts.name}")
    except ModuleNotFoundError as e:
        if e.name == f"benchmarks.{opts.name}":
            log.error("benchmark %r is not written yet (benchmarks/%s.py)", opts.name, opts.name)
            return 2
        raise
    rows = module.run(parse_args(module, rest, opts.name))
    machine = machine_description()  # after the run: it may set the thread count
    title = getattr(module, "TITLE", opts.name)
    notes = " ".join(n for n in (getattr(module, "NOTES", ""), opts.notes) if n)
    extra = getattr(module, "last_notes", None)
    if callable(extra):
        notes = " ".join(n for n in (notes, extra()) if n)
    console = Console(width=max(160, Console().width))
    console.print(rich_table(title, rows))
    console.print(describe_machine(machine))
    if not opts.no_record:
        command = "python -m benchmarks " + shlex.join(argv)
        append_markdown(
            opts.output,
            markdown_section(title, rows, command=command, machine=machine, notes=notes),
        )
        log.info("appended to %s", opts.output)
    exit_code = getattr(module, "exit_code", None)
    return exit_code(rows) if callable(exit_code) else 0
