"""Benchmarks: ``python -m dist_ast.bench <name> [options]``.

Each benchmark is a module here with ``run(args) -> list[dict]`` (one dict per table
row) and, optionally, ``add_arguments(parser)``; :mod:`dist_ast.bench.harness` does the
rest (machine description, rich table, the dated section appended to BENCHMARKS.md).
"""

BENCHMARKS = (
    "step",
    "prune",
    "memory",
    "ablation",
    "data",
    "comm",
    "checkpoint",
    "sparse24",
    "gpu",
)
