"""Test-session settings and fixtures shared by every test file."""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

# Two cores, and many tests spawn two ranks: one intra-op thread per process avoids
# oversubscription (OpenMP spin-waits make an oversubscribed CPU run several times
# slower). Set before torch is imported so that subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Hypothesis: no per-example deadline (a loaded 2-core machine makes the default 200 ms
# a coin toss) and the same examples on every run (derandomize: seeded from the test
# function), so CI fails the same way twice. HYPOTHESIS_PROFILE=explore draws fresh
# random examples, for hunting bugs locally.
settings.register_profile(
    "dist_ast",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dist_ast"))

# `from tests.<helper> import …` works under `pytest` as under `python -m pytest` (which
# adds the working directory): the helper modules are imported once, as tests.<name>.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests import ckpt_utils, data_utils  # noqa: E402

LAUNCH_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _launch_environment_restored():
    """dist_ast.distributed.setup.init_distributed exports the launcher's variables into
    os.environ; a test that runs it in-process must not leave them to the next test's
    children (an sbatch or a submitit job would inherit a stale MASTER_ADDR/PORT)."""
    saved = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A ``random.Random`` seeded from the test's id and ``DIST_AST_TEST_SEED`` (default
    0): a kill step differs between tests but is the same on every run, so a failure
    reproduces. The seed is printed (shown with the failing test's output)."""
    base = int(os.environ.get("DIST_AST_TEST_SEED", "0"))
    seed = zlib.crc32(request.node.nodeid.encode()) ^ base
    print(f"rng seed {seed} (test id hash ^ DIST_AST_TEST_SEED={base})")
    return random.Random(seed)


# -- cached reference runs and data: fixtures, so no test depends on another file's order


@pytest.fixture(scope="session")
def reference_1rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted SHORT demo run (ckpt_utils.SHORT) on one process, made once."""
    return ckpt_utils.reference_run(1, tmp_path_factory)


@pytest.fixture(scope="session")
def reference_2rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted SHORT demo run on two gloo ranks, made once."""
    return ckpt_utils.reference_run(2, tmp_path_factory)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits as shards of 400 samples (4 train shards, 1 val), written once; read-only."""
    return data_utils.digits_shards(tmp_path_factory)


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train + 10 test JPEGs per CIFAR-10 class (ImageFolder): the shared CIFAR-10
    JPEGs when ../shared has them, else 32x32 images made from the digits."""
    return data_utils.cifar_tree(tmp_path_factory)


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data_utils.cifar_shards(tmp_path_factory)


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data_utils.photo_shards(tmp_path_factory)
