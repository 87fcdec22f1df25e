"""``python -m benchmarks <name> [options]``; ``--help`` lists the benchmarks."""

import sys

from benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main())
