"""Benchmarks of dist_ast, kept beside the package (not installed with it).

Run from the repository root::

    python -m benchmarks <name> [--no-record] [--output FILE] [options]
    python -m benchmarks.<name> [--no-record] [--output FILE] [options]   # the same

Every benchmark module here keeps one contract: ``add_arguments(parser)`` declares its
options and ``run(args) -> list[dict]`` returns its table, one dict per row (optional:
``TITLE``, ``NOTES``, ``last_notes()``, ``exit_code(rows)``). :mod:`benchmarks.harness`
does the rest: the machine description, the rich table, and the dated section appended
to BENCHMARKS.md in the working directory. Other scripts may live here too (e.g.
``authors_side_by_side.py``); only the names below are benchmarks of the harness.
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
