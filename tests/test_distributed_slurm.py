"""Our Slurm launch path on a real (local) Slurm: `srun` with 2 tasks running plain
`python`, no torchrun: rank/world/local rank and tasks per node from SLURM_*, head node
from the step's node list via `scontrol show hostnames`, port from the job id.

Skips when no slurmctld answers (scripts/slurm-local.sh starts one); set
DIST_AST_REQUIRE_SLURM=1 to fail instead.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.slurm_utils import require_slurm

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(240)]

SCRIPT = textwrap.dedent(
    """
    import json, os, torch, torch.distributed as dist
    from dist_ast.distributed.setup import detect_launch, destroy_distributed, init_distributed
    launch = detect_launch()
    info = init_distributed("cpu")
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    out = dict(launcher=launch.launcher, rank=info.rank, world=info.world_size,
               local_rank=info.local_rank, local_world=launch.local_world_size,
               addr=os.environ["MASTER_ADDR"],
               port=int(os.environ["MASTER_PORT"]), job=os.environ["SLURM_JOB_ID"],
               sum=t.item())
    with open(f"rank{info.rank}.json", "w") as f:
        json.dump(out, f)
    destroy_distributed(synchronize=True)
    """
)


@pytest.fixture(autouse=True)
def _slurm() -> None:
    require_slurm()


def test_srun_two_tasks_join_one_group_from_slurm_env(tmp_path: Path) -> None:
    import json

    from dist_ast.distributed.setup import slurm_port

    (tmp_path / "probe.py").write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "job.sh").write_text(
        f"""#!/bin/bash
#SBATCH --ntasks=2 --time=3 --job-name=dist_ast-test-setup
set -euo pipefail
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT SUBMITIT_EXECUTOR
export PYTHONPATH={root}
srun {sys.executable} probe.py
"""
    )
    r = subprocess.run(
        ["sbatch", "--wait", "--output=out.txt", "job.sh"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=200,
    )
    log = (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else ""
    assert r.returncode == 0, r.stderr + log
    rows = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["rank"] for x in rows] == [0, 1]
    for x in rows:
        assert x["launcher"] == "slurm" and x["world"] == 2 and x["sum"] == 3.0
        assert x["local_world"] == 2  # from SLURM_STEP_TASKS_PER_NODE: one node, 2 tasks
        assert x["port"] == slurm_port(x["job"])
    assert rows[0]["addr"] == rows[1]["addr"]
