"""``python -m dist_ast.bench <name> [options]``; ``--help`` lists the benchmarks."""

import sys

from dist_ast.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
