"""Checkpoints and resume (DESIGN §4, issue 5).

- kill -9 at a random step after a checkpoint, rerun the same command: summary.json,
  metrics.jsonl and every weight, mask and BatchNorm statistic equal the uninterrupted
  run bit for bit (CPU, one rank; tests/test_preemption.py does two ranks and 2 -> 1).
- the same with engine=deepspeed (ZeRO-2, fp32 and bf16): DeepSpeed's own checkpoint of
  its partitions resumes bit for bit;
- a crash in the middle of writing leaves the previous checkpoint, which resume uses;
- a corrupted, foreign or mismatched checkpoint fails with a message naming the problem
  and writes nothing;
- the pieces: RNG states as tensors, keep-K, metrics truncation, the safe unpickler.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from dist_ast.checkpoint import CheckpointError, ReusedStagingStager, complete_checkpoints
from dist_ast.checkpoint_io import MetadataUnpickler, verify_checkpoint, write_manifest
from dist_ast.metrics import truncate_metrics
from dist_ast.state_codecs import rng_state, set_rng_state
from tests import ckpt_utils as cu
from tests.deps import require


@pytest.fixture(scope="module")
def reference(reference_1rank: Path) -> Path:
    """The uninterrupted 24-step run, with checkpoints at 8, 16, 24 (conftest, once a session)."""
    return reference_1rank


# --------------------------------------------------------------------------- end to end


ASYNC = "checkpoint.async_save=true"  # the killed run writes in a thread: a kill may land mid-write


@pytest.mark.slow
def test_kill9_then_same_command_resumes_bit_exact(reference, tmp_path, rng):
    run_dir = tmp_path / "run"
    kill_after = rng.randint(9, 20)  # some step after the step-8 checkpoint (seeded)
    cu.kill9_when(
        run_dir,
        (ASYNC,),
        # an async save commits a step or two after it was staged: wait for one
        lambda d: bool(cu.last_step(d) >= kill_after and complete_checkpoints(d)),
        f"step {kill_after} and a complete checkpoint",
    )
    killed_at = cu.last_step(run_dir)
    assert not (run_dir / "summary.json").exists()
    newest = complete_checkpoints(run_dir)[-1][0]
    assert 8 <= newest <= killed_at

    r = cu.run_train(run_dir, ASYNC)  # the same command
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{newest}'}" in r.stdout + r.stderr
    cu.assert_same_run(reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_kill9_then_same_command_resumes_bit_exact(precision, tmp_path):
    """engine=deepspeed (ZeRO-2): the engine's own checkpoint (flat fp32 master partitions
    and momentum) beside the AST state; killed after step 16 was saved, the same command
    resumes and ends equal to the uninterrupted run bit for bit."""
    require("deepspeed")  # pinned in constraints.txt: a missing one fails, never skips
    overrides = ("engine=deepspeed", f"train.precision={precision}")
    reference = tmp_path / "reference"
    cu.run_train(reference, *overrides)
    run_dir = tmp_path / "run"
    cu.kill9_when(
        run_dir,
        overrides,
        lambda d: cu.last_step(d) >= 17 and 16 in dict(complete_checkpoints(d)),
        "step 17 with the step-16 checkpoint written",
    )
    assert (run_dir / "checkpoints" / "step-16" / "deepspeed").is_dir()

    # DeepSpeed's own files are in the manifest, checked like DCP's
    manifest = json.loads((run_dir / "checkpoints" / "step-16" / "manifest.json").read_text())
    assert any(f.startswith("deepspeed/engine/") for f in manifest["files"]), manifest
    assert verify_checkpoint(run_dir / "checkpoints" / "step-16")

    r = cu.run_train(run_dir, *overrides)  # the same command
    assert f"resumed from {run_dir / 'checkpoints' / 'step-16'}" in r.stdout + r.stderr
    cu.assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_crash_mid_write_keeps_previous_checkpoint(reference, tmp_path, monkeypatch):
    """The second save fails half-way through writing its shards (in-process, so the
    failure point is exact): an unexpected error is re-raised as it is, its .tmp- folder
    is removed, resume takes step-8 and the run still ends equal to the uninterrupted
    one. A process killed mid-write leaves its .tmp- folder: resume ignores it and the
    next save deletes it."""
    from torch.distributed.checkpoint import FileSystemWriter

    from dist_ast.cli import compose_config
    from dist_ast.train import run

    run_dir = tmp_path / "run"
    config = compose_config([*cu.SHORT, f"run_dir={run_dir}"])
    real_write = FileSystemWriter.write_data
    calls = {"n": 0}

    def dying_write(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:
            # a partial shard on disk, then the process "dies"
            (Path(self.path) / "__0_0.distcp").write_bytes(b"\x00" * 1000)
            raise _Crash("simulated crash while writing step 16")
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", dying_write)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float sums
    try:
        with pytest.raises(CheckpointException, match="simulated crash"):  # DCP wraps it
            run(config)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-8"]
    assert [s for s, _ in complete_checkpoints(run_dir)] == [8]
    # what kill -9 in the middle of the write would have left
    (ckpts / ".tmp-step-16").mkdir()
    (ckpts / ".tmp-step-16" / "__0_0.distcp").write_bytes(b"\x00" * 1000)

    cu.run_train(run_dir)  # the same command, as a fresh process
    cu.assert_same_run(reference, run_dir)
    assert not list(ckpts.glob(".tmp-*")), "the next save clears crashed leftovers"


class _Crash(RuntimeError):
    pass


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _corrupt_truncated_shard(ck: Path) -> None:
    shard = ck / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])


def _corrupt_metadata_garbage(ck: Path) -> None:
    (ck / ".metadata").write_bytes(b"this is not a pickle")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dist_ast_pwned",))


def _corrupt_metadata_evil(ck: Path) -> None:
    (ck / ".metadata").write_bytes(pickle.dumps(_Evil()))


def _corrupt_meta_json(ck: Path) -> None:
    (ck / "meta.json").write_text("{ not json")


def _foreign_model(ck: Path) -> None:
    meta = json.loads((ck / "meta.json").read_text())
    meta["model"] = "resnet50"
    (ck / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "overrides", "message"),
    [
        (_corrupt_truncated_shard, [], "corrupted or unreadable"),
        (_corrupt_metadata_garbage, [], ".metadata does not load"),
        (_corrupt_metadata_evil, [], "refusing to unpickle posix.system"),
        (_corrupt_meta_json, [], "meta.json does not parse"),
        (_foreign_model, [], "model: checkpoint has 'resnet50', this run has 'tiny_cnn'"),
        (None, ["ast.sparsities=[0.5,0.9]"], "num_subnets: checkpoint has 3, this run has 2"),
    ],
    ids=[
        "truncated-shard",
        "garbage-metadata",
        "evil-pickle",
        "bad-meta-json",
        "other-model",
        "other-subnet-count",
    ],
)
def test_bad_checkpoint_fails_clearly_and_writes_nothing(
    reference, tmp_path, damage, overrides, message
):
    """The checks behind the checksums: each damaged file is sealed into a new manifest
    (as a checkpoint written bad, or one from before manifests, would be), so the
    content checks themselves must catch it (tests/test_checkpoint_integrity.py covers
    damage after the write)."""
    from dist_ast.cli import compose_config
    from dist_ast.train import run

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for p in ("summary.json", "model.pt"):
        (run_dir / p).unlink()
    for step in (8, 24):  # resume=auto picks step-16, the damaged one
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    if damage is not None:
        damage(run_dir / "checkpoints" / "step-16")
        write_manifest(run_dir / "checkpoints" / "step-16")
    before = _snapshot(run_dir)
    pwned = Path("/tmp/dist_ast_pwned")
    pwned.unlink(missing_ok=True)
    config = compose_config([*cu.SHORT, f"run_dir={run_dir}", *overrides])
    with pytest.raises(CheckpointError) as err:
        run(config)
    assert message in str(err.value)
    assert "step-16" in str(err.value)
    assert _snapshot(run_dir) == before, "a failed resume must not write anything"
    assert not pwned.exists()


# --------------------------------------------------------------------------- pieces


def test_staging_reuses_buffers_and_follows_structure_changes():
    """Async saves stage into the previous save's CPU buffers; the staged copy is a
    snapshot (later training writes do not reach it); new paths, shapes or dtypes get
    new buffers, so a state that grows between saves stages correctly."""
    stager = ReusedStagingStager()
    w = torch.randn(5, 3)
    state = {"model": {"w": w}, "gc": {"prev": {}}, "log": torch.zeros(1, 3, dtype=torch.long)}
    first = stager.stage(state)
    assert torch.equal(first["model"]["w"], w) and first["model"]["w"] is not w
    w.add_(1.0)  # training goes on
    assert not torch.equal(first["model"]["w"], w)
    ptr = first["model"]["w"].data_ptr()

    state["gc"]["prev"] = {"0": torch.ones(4)}  # appears after the first step
    state["log"] = torch.ones(2, 3, dtype=torch.long)  # the mask-update log grew
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == ptr  # same memory, new values
    assert torch.equal(second["model"]["w"], w)
    assert torch.equal(second["gc"]["prev"]["0"], torch.ones(4))
    assert torch.equal(second["log"], state["log"]) and second["log"].shape == (2, 3)


def test_rng_states_round_trip_as_tensors():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    np.random.standard_normal()
    state = rng_state(torch.device("cpu"))
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    expect = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(state, torch.device("cpu"))
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


def test_restricted_unpickler_refuses_code():
    data = pickle.dumps(_Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        MetadataUnpickler(io.BytesIO(data)).load()


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']  # cut by kill
    path.write_text("\n".join(lines) + "\n")
    assert truncate_metrics(path, 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_keep_last_k_and_listing(reference):
    # keep=3 by default: 8, 16 and 24 all survive; only complete step-N folders count
    assert [s for s, _ in complete_checkpoints(reference)] == [8, 16, 24]
    meta = json.loads((reference / "checkpoints" / "step-24" / "meta.json").read_text())
    assert meta["step"] == 24 and meta["model"] == "tiny_cnn" and meta["num_subnets"] == 3
    assert meta["config"]["checkpoint"]["every_steps"] == 8


def test_triggers_every_steps_and_every_minutes(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dist_ast.checkpoint import Checkpointer
    from dist_ast.config import RunConfig
    from dist_ast.distributed.setup import DistInfo

    config = RunConfig(run_dir=str(tmp_path))
    config.checkpoint.every_steps, config.checkpoint.every_minutes = 50, 2.0
    trainer = SimpleNamespace(config=config, dist=DistInfo(0, 1, 0, torch.device("cpu")))
    now = [1000.0]
    monkeypatch.setattr("dist_ast.checkpoint.time.monotonic", lambda: now[0])
    ck = Checkpointer(trainer)
    assert [s for s in range(1, 201) if ck.steps_due(s)] == [50, 100, 150, 200]
    now[0] += 119.0
    assert not ck.minutes_due
    now[0] += 1.0
    assert ck.minutes_due
    config.checkpoint.every_minutes = 0.0
    assert not ck.minutes_due  # 0 = off
