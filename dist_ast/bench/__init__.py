"""Benchmarks (run as modules, e.g. ``python -m dist_ast.bench.comm``)."""
