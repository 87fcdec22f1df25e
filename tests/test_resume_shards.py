"""Resuming runs that read shards (issue 15, item 3): the loader position in the DCP
checkpoint, DALI's own checkpointed reader state and the wds loader's ``bad_samples``
counter, end to end through the real command line.

For each loader (``data.loader=wds`` with 2 DataLoader workers, ``data.loader=dali`` on
the CPU) a short tiny-CNN run on ``data=digits_shards`` is

- killed with SIGKILL after a checkpoint, then the same command rerun, and
- preempted with SIGTERM (saves, exits 75), then the same command rerun;

each ends bit-identical to the uninterrupted run: summary.json, metrics.jsonl, every
weight, mask and BatchNorm statistic. The runs cross epoch boundaries (23 batches per
epoch, 40 steps), so the resume lands mid-epoch in epoch 0 or 1.

The wds shards carry corrupt JPEGs, which the loader skips and counts; the count in
metrics.jsonl goes on from the checkpoint's value (the corrupt samples read before the
checkpoint are not read again). DALI stops on a corrupt JPEG (test_data_bad.py), so its
shards are clean.

Also the README's ``python -m dist_ast.train experiment=demo data=digits_shards
data.loader=dali`` for its first steps (``train.stop_after_steps``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import nvidia.dali  # noqa: F401 - pinned in constraints.txt: fail here, never skip
import pytest

from dist_ast.checkpoint import complete_checkpoints
from dist_ast.preemption import REQUEUE_EXIT_CODE
from tests import ckpt_utils as cu
from tests.data_utils import corrupt_jpeg

# waits of at most 120 s each (ckpt_utils), the first test also makes both references
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 40
# corrupt JPEGs (shard, index row) in the wds shards: spread so that some are read early
CORRUPT = [("train-000000", 3), ("train-000001", 100), ("train-000003", 250)]


def overrides(loader: str, root: Path) -> tuple[str, ...]:
    return (
        "data=digits_shards",
        f"data.loader={loader}",
        f"data.root={root}",
        "data.num_workers=2",  # wds: 2 DataLoader worker processes; DALI: 2 threads
        "model.width=8",
        f"train.max_steps={STEPS}",
        "ast.ramp_end_epoch=1",
        "checkpoint.every_steps=6",
    )


@pytest.fixture(scope="module")
def shard_sets(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("resume_shards")
    corrupt = Path(shutil.copytree(digits_shards, base / "corrupt"))
    for shard, pos in CORRUPT:
        corrupt_jpeg(corrupt, shard, pos)
    return {"wds": corrupt, "dali": digits_shards}


@pytest.fixture(scope="module")
def references(shard_sets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted run of each loader, made once for the module."""
    out = {}
    for loader, root in shard_sets.items():
        run_dir = tmp_path_factory.mktemp(f"ref_{loader}") / "run"
        cu.run_train(run_dir, *overrides(loader, root), timeout=120)
        out[loader] = run_dir
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bad_samples_at(run_dir: Path) -> dict[int, int]:
    return {r["step"]: r["bad_samples"] for r in metrics(run_dir) if "bad_samples" in r}


def resumed_step(output: str) -> int:
    """The step of the 'resumed from … (step N)' line."""
    line = next(x for x in output.splitlines() if "resumed from" in x)
    return int(line.rsplit("(step ", 1)[1].split(")")[0])


def check_bad_samples(loader: str, reference: Path, run_dir: Path, resumed_at: int) -> None:
    ref, got = bad_samples_at(reference), bad_samples_at(run_dir)
    assert got == ref  # every logged step, before and after the resume
    if loader == "wds":
        # the test means something only if corrupt samples were counted before the
        # checkpoint the run resumed from and more after it
        assert 0 < ref[resumed_at] < ref[STEPS], (resumed_at, ref[resumed_at], ref[STEPS])
    else:
        assert set(ref.values()) == {0}


@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_kill9_then_same_command_resumes_from_shards_bit_exact(
    loader, shard_sets, references, tmp_path, rng
):
    over = overrides(loader, shard_sets[loader])
    first_bad = min((s for s, n in bad_samples_at(references[loader]).items() if n), default=0)
    lo = max(8, first_bad + 7)  # a checkpoint (every 6 steps) after the first corrupt one
    kill_after = rng.randint(lo, 26)
    run_dir = tmp_path / "run"
    cu.kill9_when(
        run_dir,
        over,
        lambda d: cu.last_step(d) >= kill_after and bool(complete_checkpoints(d)),
        f"step {kill_after} and a complete checkpoint",
    )
    assert not (run_dir / "summary.json").exists()
    newest = complete_checkpoints(run_dir)[-1][0]

    r = cu.run_train(run_dir, *over, timeout=120)  # the same command
    out = r.stdout + r.stderr
    assert resumed_step(out) == newest
    cu.assert_same_run(references[loader], run_dir)
    check_bad_samples(loader, references[loader], run_dir, newest)


@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_sigterm_saves_exits_75_then_same_command_resumes_from_shards_bit_exact(
    loader, shard_sets, references, tmp_path, rng
):
    over = overrides(loader, shard_sets[loader])
    first_bad = min((s for s, n in bad_samples_at(references[loader]).items() if n), default=0)
    target = rng.randint(max(3, first_bad + 1), 26)  # any step: preemption saves it
    run_dir = tmp_path / "run"
    log = tmp_path / "preempted.log"
    proc = cu.start_train(run_dir, *over, log=log)
    code = cu.signal_when(
        proc, run_dir, lambda d: cu.last_step(d) >= target, f"step {target}", signal.SIGTERM
    )
    assert code == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    saved = cu.last_step(run_dir)
    assert target <= saved < STEPS
    assert complete_checkpoints(run_dir)[-1][0] == saved  # saved the step it stopped at
    assert not (run_dir / "summary.json").exists()

    r = cu.run_train(run_dir, *over, timeout=120)  # the same command, as a requeue would
    assert resumed_step(r.stdout + r.stderr) == saved
    cu.assert_same_run(references[loader], run_dir)
    check_bad_samples(loader, references[loader], run_dir, saved)


def test_readme_demo_from_shards_with_dali(tmp_path):
    """README: ``python -m dist_ast.train experiment=demo data=digits_shards
    data.loader=dali`` writes the shards on first use and trains from them (the first 12
    steps of the unchanged demo schedule)."""
    root, run_dir = tmp_path / "shards", tmp_path / "demo"
    readme = ["experiment=demo", "data=digits_shards", "data.loader=dali"]
    cmd = [cu.PY, "-m", "dist_ast.train", *readme, f"data.root={root}", f"run_dir={run_dir}"]
    cmd += ["train.stop_after_steps=12", "train.progress=false"]
    r = subprocess.run(cmd, cwd=cu.REPO, env=cu.env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "writing the digits demo shards" in r.stdout + r.stderr
    assert (root / "manifest.json").is_file()
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 12 and s["total_steps"] == 30 * 23  # 30 epochs of 23 batches
    assert [x["target_sparsity"] for x in s["subnets"]] == [0.5, 0.8, 0.9]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["loader"] == "dali" and cfg["data"]["name"] == "digits_shards"
    assert all(0.0 <= x["top1"] <= 1.0 for x in s["subnets"])
