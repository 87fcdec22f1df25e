"""Dependencies that constraints.txt pins and tests need (DALI, DeepSpeed, submitit, …):
a missing one fails the test run with the fix named, instead of turning into a skip."""

from __future__ import annotations

import importlib.util

import pytest


def require(module: str) -> None:
    """Fail (at collection when called at module level) unless ``module`` is installed.
    Checks without importing, so that e.g. DeepSpeed is imported only where it runs."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{module} is not installed, but the tests need it and constraints.txt pins it: "
            "run `make install` (pip install -c constraints.txt -e '.[deepspeed,dali,dev]')",
            pytrace=False,
        )
