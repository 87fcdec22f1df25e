"""Checkpoints that prove they are whole, and saves that fail cleanly (issue 13, items 2
and 5).

- each kind of damage to the newest checkpoint (a truncated shard, a missing shard, a
  flipped byte, a missing ``.metadata``, a missing manifest): the same ``run(config)``
  logs one warning naming the file, resumes from the checkpoint before it and ends bit
  for bit equal to the uninterrupted run (which equals a run resumed from that
  checkpoint: tests/test_checkpoint.py);
- a checkpoint written before manifests existed resumes, with a log line saying so;
- an explicit ``checkpoint.resume=<damaged path>``, and a run_dir whose checkpoints are
  all damaged, stop with a CheckpointError and write nothing;
- rotation (``keep=1``) never deletes the only intact checkpoint for a damaged newer one;
- a disk that fills up while saving (a DCP writer that writes part of a shard and raises
  ENOSPC), sync and async: the previous checkpoint stays intact and resumes, the ``.tmp-``
  folder is gone, and the run stops with a one-line CheckpointError.

The runs are in-process (the reference run of conftest is a subprocess): a run resumed
from step 8 is 16 steps of the demo, a few seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from dist_ast.checkpoint import (
    MANIFEST_FILE,
    META_FILE,
    TMP_PREFIX,
    Checkpointer,
    CheckpointError,
    check_compatible,
    verify_checkpoint,
)
from dist_ast.cli import compose_config
from tests import ckpt_utils as cu


@pytest.fixture(scope="module")
def reference(reference_1rank: Path) -> Path:
    """The uninterrupted 24-step run, with checkpoints at 8, 16, 24 (conftest, once a session)."""
    return reference_1rank


def _run(run_dir: Path, *overrides: str) -> dict:
    """``python -m dist_ast.train`` with the SHORT settings, in this process."""
    from dist_ast.cli import compose_config
    from dist_ast.train import run

    config = compose_config(cu.merged(f"run_dir={run_dir}", *overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference subprocess (OMP_NUM_THREADS=1): same sums
    try:
        return run(config)
    finally:
        torch.set_num_threads(threads)


def _stopped_after(reference: Path, tmp_path: Path, step: int) -> Path:
    """The reference run as a run stopped right after its step-``step`` checkpoint:
    summary.json, model.pt and the later checkpoints gone (resume drops the later
    metrics.jsonl records)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for p in ("summary.json", "model.pt"):
        (run_dir / p).unlink()
    for s in (8, 16, 24):
        if s > step:
            shutil.rmtree(run_dir / "checkpoints" / f"step-{s}")
    return run_dir


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# --------------------------------------------------------------------------- kinds of damage


def _truncate_shard(ck: Path) -> str:
    shard = ck / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return "__0_0.distcp"


def _delete_shard(ck: Path) -> str:
    (ck / "__0_0.distcp").unlink()
    return "__0_0.distcp"


def _flip_byte(ck: Path) -> str:
    shard = ck / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: the same size, a different value
    shard.write_bytes(bytes(data))
    return "__0_0.distcp"


def _delete_metadata(ck: Path) -> str:
    (ck / ".metadata").unlink()
    return ".metadata"


def _delete_manifest(ck: Path) -> str:
    (ck / MANIFEST_FILE).unlink()
    return MANIFEST_FILE


DAMAGE = [_truncate_shard, _delete_shard, _flip_byte, _delete_metadata, _delete_manifest]
DAMAGE_IDS = ["truncated-shard", "missing-shard", "flipped-byte", "missing-metadata", "no-manifest"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE, ids=DAMAGE_IDS)
def test_damaged_newest_checkpoint_falls_back_bit_exact(reference, tmp_path, caplog, damage):
    run_dir = _stopped_after(reference, tmp_path, 16)
    ckpts = run_dir / "checkpoints"
    name = damage(ckpts / "step-16")
    caplog.set_level(logging.INFO, logger="dist_ast")

    _run(run_dir)  # the same command

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("dist_ast.checkpoint")
    ]
    assert len(warnings) == 1, warnings
    assert f"{ckpts / 'step-16'} is damaged: {name}" in warnings[0]
    assert str(ckpts / "step-8") in warnings[0]
    assert f"resumed from {ckpts / 'step-8'} (step 8)" in caplog.text
    cu.assert_same_run(reference, run_dir)
    assert _steps(run_dir) == ["step-16", "step-24", "step-8"]
    assert verify_checkpoint(ckpts / "step-16"), "the damaged step was written again, whole"


def test_manifest_lists_every_file_with_size_and_crc(reference):
    """Every file of a checkpoint is in its manifest, with its size; meta.json names it."""
    ck = reference / "checkpoints" / "step-24"
    manifest = json.loads((ck / MANIFEST_FILE).read_text())
    on_disk = {p.name: p.stat().st_size for p in ck.iterdir() if p.name != MANIFEST_FILE}
    assert {k: v["size"] for k, v in manifest["files"].items()} == on_disk
    assert {".metadata", META_FILE, "__0_0.distcp"} <= set(on_disk)
    assert all(len(v["crc32c"]) == 8 for v in manifest["files"].values())
    assert json.loads((ck / META_FILE).read_text())["manifest"] == MANIFEST_FILE
    assert verify_checkpoint(ck)


@pytest.mark.slow
def test_checkpoint_without_manifest_resumes_with_a_log_line(reference, tmp_path, caplog):
    """A checkpoint written before manifests (no manifest.json, meta.json names none)."""
    run_dir = _stopped_after(reference, tmp_path, 16)
    ck = run_dir / "checkpoints" / "step-16"
    (ck / MANIFEST_FILE).unlink()
    meta = json.loads((ck / META_FILE).read_text())
    del meta["manifest"]
    (ck / META_FILE).write_text(json.dumps(meta))
    caplog.set_level(logging.INFO, logger="dist_ast")

    _run(run_dir)

    assert f"checkpoint {ck} has no {MANIFEST_FILE} (written before" in caplog.text
    assert f"resumed from {ck} (step 16)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    cu.assert_same_run(reference, run_dir)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "damage", [_flip_byte, _delete_manifest], ids=["flipped-byte", "no-manifest"]
)
def test_explicit_damaged_path_is_an_error(reference, tmp_path, damage):
    run_dir = _stopped_after(reference, tmp_path, 24)
    ck = run_dir / "checkpoints" / "step-16"
    name = damage(ck)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as err:
        _run(run_dir, f"checkpoint.resume={ck}")
    msg = str(err.value)
    assert f"checkpoint {ck} is damaged: {name}" in msg
    assert "checkpoint.resume=auto takes the newest intact one" in msg
    assert "\n" not in msg
    assert _snapshot(run_dir) == before, "a refused resume writes nothing"


def test_all_checkpoints_damaged_is_an_error(reference, tmp_path):
    """resume=auto does not start afresh over damaged checkpoints: it stops and says so."""
    run_dir = _stopped_after(reference, tmp_path, 16)
    _truncate_shard(run_dir / "checkpoints" / "step-16")
    _delete_metadata(run_dir / "checkpoints" / "step-8")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="no intact checkpoint in") as err:
        _run(run_dir)
    assert "step-16 is damaged: __0_0.distcp has" in str(err.value)
    assert "step-8 is damaged: .metadata is missing" in str(err.value)
    assert "checkpoint.resume=never" in str(err.value)
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_rotation_keeps_the_intact_checkpoint(reference, tmp_path):
    """keep=1 with a damaged step-24 beside it: the run falls back to step-8, saves
    step-16 and stops there; rotation removes step-8 but keeps step-16 (the only intact
    checkpoint, though step-24 is newer), which the next resume takes."""
    from types import SimpleNamespace

    from dist_ast.checkpoint import resolve_resume

    run_dir = _stopped_after(reference, tmp_path, 24)
    shutil.rmtree(run_dir / "checkpoints" / "step-16")
    _flip_byte(run_dir / "checkpoints" / "step-24")

    _run(run_dir, "checkpoint.keep=1", "train.stop_after_steps=16")

    ckpts = run_dir / "checkpoints"
    assert _steps(run_dir) == ["step-16", "step-24"]
    assert verify_checkpoint(ckpts / "step-16")
    config = SimpleNamespace(run_dir=str(run_dir), checkpoint=SimpleNamespace(resume="auto"))
    assert resolve_resume(config) == ckpts / "step-16"


# --------------------------------------------------------------------------- disk full


class _DiskFullWriter(FileSystemWriter):
    """DCP's writer on a disk that fills up during the step-16 save: part of the shard
    is written, then ENOSPC, as ``write`` raises it."""

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 - DCP's signature
        folder = Path(self.path)
        if folder.name != f"{TMP_PREFIX}16":
            return super().write_data(plan, planner)
        shard = folder / "__0_0.distcp"
        shard.write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shard))


def _assert_disk_full_error(msg: str, run_dir: Path) -> None:
    ckpts = run_dir / "checkpoints"
    assert "\n" not in msg
    assert msg.startswith("saving the checkpoint of step 16 failed: No space left on device")
    assert "(ENOSPC) writing" in msg and f"{TMP_PREFIX}16" in msg
    assert f"the newest intact checkpoint is {ckpts / 'step-8'}" in msg
    assert f"free space on the disk of {ckpts} or set run_dir" in msg


@pytest.mark.slow
def test_disk_full_sync_save_keeps_previous_and_stops(reference, tmp_path, monkeypatch):
    run_dir = _stopped_after(reference, tmp_path, 8)
    monkeypatch.setattr(Checkpointer, "writer_class", _DiskFullWriter)
    with pytest.raises(CheckpointError) as err:
        _run(run_dir)
    _assert_disk_full_error(str(err.value), run_dir)
    assert _steps(run_dir) == ["step-8"], "the .tmp- folder is removed"
    assert verify_checkpoint(run_dir / "checkpoints" / "step-8")
    assert cu.last_step(run_dir) == 16 and not (run_dir / "summary.json").exists()

    monkeypatch.undo()  # space freed: the same command resumes from step 8
    _run(run_dir)
    cu.assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_disk_full_async_save_reported_at_a_step_boundary(reference, tmp_path, monkeypatch):
    """The write fails in DCP's thread; a later step boundary raises it (the run does not
    reach its end). step-8, written asynchronously with its manifest at commit, stays
    intact and resumes."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(Checkpointer, "writer_class", _DiskFullWriter)
    with pytest.raises(CheckpointError) as err:
        _run(run_dir, "checkpoint.async_save=true")
    _assert_disk_full_error(str(err.value), run_dir)
    assert _steps(run_dir) == ["step-8"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step-8")
    assert 16 <= cu.last_step(run_dir) < 24 and not (run_dir / "summary.json").exists()

    monkeypatch.undo()
    _run(run_dir, "checkpoint.async_save=true")
    cu.assert_same_run(reference, run_dir)


def test_a_checkpoint_with_other_shared_batchnorms_is_refused_in_one_line(tmp_path):
    """``model.shared_batchnorm`` changes parameter shapes: resuming across it must stop
    with the key named, not with a shape mismatch deep in the loader. A meta.json written
    before the key existed means "none shared"."""
    meta = {"model": "tiny_cnn", "num_subnets": 3, "sparsities": [0.5, 0.8, 0.9]}
    meta |= {"mode": "alternating", "num_classes": 10}
    plain = compose_config(["experiment=demo"])
    assert [plain.model.name, list(plain.ast.sparsities), plain.ast.mode] == [
        meta["model"], meta["sparsities"], meta["mode"]
    ]  # fmt: skip
    check_compatible(meta, plain, tmp_path)  # older meta.json, nothing shared: accepted
    check_compatible({**meta, "shared_batchnorm": []}, plain, tmp_path)
    shared = compose_config(["experiment=demo", "model.shared_batchnorm=[bn1]"])
    with pytest.raises(CheckpointError, match=r"shared_batchnorm: checkpoint has \[\]") as e:
        check_compatible({**meta, "shared_batchnorm": []}, shared, tmp_path)
    assert "\n" not in str(e.value)
