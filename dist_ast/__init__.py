"""dist_ast: N sparse sub-networks of one model in one distributed run (AST, NeurIPS 2022)."""

__version__ = "0.1.0"
