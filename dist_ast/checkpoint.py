"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DESIGN §4): when to save,
the atomic write, rotation, which checkpoint to resume from, loading.

``run_dir/checkpoints/step-<N>/`` holds DCP's shards and ``.metadata``, ``meta.json`` and
``manifest.json`` (size and crc32c of every file). It is written as ``.tmp-step-<N>`` and
renamed by rank 0 once every rank wrote; ``resume=auto`` still checks the manifest (a disk
or a copy can damage it later) and falls back to the newest intact one. The trainer hands
over a ``dict[str, Stateful]`` holding tensors only (loading unpickles nothing); a part
with ``save_files``/``load_files`` (DeepSpeed) writes a folder of its key beside the shards.
Safe reading and integrity checks are in ``checkpoint_io``, tensor codecs in ``state_codecs``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.stateful import Stateful

from dist_ast.checkpoint_io import (
    CHECKSUM,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    STEP_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    DamagedCheckpointError,
    SafeFileSystemReader,
    checksum_files,
    file_crc32c,
    read_dcp_metadata,
    read_meta,
    verify_checkpoint,
    write_manifest,
    write_synced,
)
from dist_ast.config import RunConfig, config_as_dict

if TYPE_CHECKING:
    from dist_ast.distributed.setup import DistInfo

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it assumes one process: we pass
# no_dist=True on purpose there.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or uninitialized",
    category=UserWarning,
)


class CheckpointOwner(Protocol):
    """What the manager reads of its owner (the Trainer)."""

    config: RunConfig
    dist: DistInfo
    step: int

    def stateful_parts(self) -> dict[str, Stateful]: ...


# --------------------------------------------------------------------------- layout


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-<N>`` folder, whole or not, oldest first: what
    ``resume=auto`` considers (a renamed folder that lost a file is damage to report,
    not something to skip silently)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        tail = p.name[len(STEP_PREFIX) :]
        if p.name.startswith(STEP_PREFIX) and tail.isdigit() and p.is_dir():
            out.append((int(tail), p))
    return sorted(out)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``step-<N>`` folders with both DCP's ``.metadata`` and our ``meta.json``."""
    return [
        (n, p)
        for n, p in step_folders(run_dir)
        if (p / ".metadata").is_file() and (p / META_FILE).is_file()
    ]


def resolve_resume(config: RunConfig) -> Path | None:
    """The checkpoint this run starts from: ``checkpoint.resume`` = auto (the newest
    intact one in run_dir, or none), never, or a ``step-<N>`` folder (must be intact)."""
    mode = config.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        return _newest_intact(config.run_dir, warn=True)
    path = Path(mode)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={mode!r}: no such checkpoint folder (give a "
            "run_dir/checkpoints/step-<N> folder, or auto / never)"
        )
    try:
        _verify_logged(path)
    except DamagedCheckpointError as e:
        raise CheckpointError(
            f"checkpoint.resume={mode!r}: {e}. Point checkpoint.resume at an intact "
            "checkpoint (checkpoint.resume=auto takes the newest intact one in run_dir)"
        ) from None
    return path


def _newest_intact(run_dir: str | os.PathLike, warn: bool) -> Path | None:
    """The newest checkpoint that matches its manifest (or predates manifests); None when
    run_dir has none, a CheckpointError when every one is damaged."""
    damaged: list[DamagedCheckpointError] = []
    for _, folder in reversed(step_folders(run_dir)):
        try:
            _verify_logged(folder)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        if warn:
            for e in damaged:
                log.warning("%s; resuming from the newest intact checkpoint, %s", e, folder)
        return folder
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {checkpoint_dir(run_dir)}: "
            + "; ".join(str(e) for e in damaged)
            + ". Restore a checkpoint there, or start afresh with checkpoint.resume=never "
            "(or another run_dir, which keeps these for inspection)"
        )
    return None


def _verify_logged(folder: Path) -> None:
    start = time.perf_counter()
    if verify_checkpoint(folder):
        log.info("checkpoint %s matches its manifest (%.2f s)", folder, time.perf_counter() - start)
    else:
        log.info(
            "checkpoint %s has no %s (written before dist_ast recorded checksums): resuming "
            "from it without checking its files",
            folder,
            MANIFEST_FILE,
        )


def check_resume(config: RunConfig) -> Path | None:
    """The checkpoint to resume from, checked before anything is built or written; None
    for a fresh start. Rank 0 reads the checksums and every rank gets its choice."""
    path = _on_rank0(lambda: resolve_resume(config))
    if path is None:
        return None
    meta = read_meta(path)
    check_compatible(meta, config, path)
    read_dcp_metadata(path)
    return path


def _on_rank0(fn: Callable[[], Path | None]) -> Path | None:
    """``fn()`` on rank 0, its result (or its CheckpointError) broadcast to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    err: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            err, box[0] = e, ("error", str(e))
    # CPU tensors: gloo in a cpu:gloo,cuda:nccl group
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    if err is not None:
        raise err
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _identity(c: RunConfig) -> dict:
    """What a checkpoint must share with the run that resumes from it."""
    return {
        "model": c.model.name,
        "num_subnets": c.ast.num_subnets,
        "sparsities": [float(s) for s in c.ast.sparsities],
        "mode": c.ast.mode,
        "num_classes": c.model.num_classes,
        "shared_batchnorm": list(c.model.shared_batchnorm),  # changes the parameter shapes
    }


_IDENTITY_ADDED_LATER = {"shared_batchnorm": []}  # what older meta.json files implied


def check_compatible(meta: dict, config: RunConfig, path: Path) -> None:
    """Refuse a checkpoint of another model, sub-net count, sparsities, mode or set of
    shared BatchNorms."""
    wrong = [
        f"{k}: checkpoint has {saved!r}, this run has {v!r}"
        for k, v in _identity(config).items()
        if (saved := meta.get(k, _IDENTITY_ADDED_LATER.get(k))) != v
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} does not match this run ({'; '.join(wrong)}). Use a run_dir "
            "of its own for a different model/sub-nets, or checkpoint.resume=never to start "
            "fresh"
        )


# --------------------------------------------------------------------------- parts


def is_file_part(part: object) -> bool:
    """A part that saves files of its own (``save_files``/``load_files``) instead of tensors."""
    return hasattr(part, "save_files") and hasattr(part, "load_files")


def dcp_state(parts: dict[str, Stateful]) -> dict[str, Any]:
    """The nested DCP state of ``parts``: each tensor part's ``state_dict()`` under its key."""
    return {k: p.state_dict() for k, p in parts.items() if not is_file_part(p)}


def save_files(parts: dict[str, Stateful], folder: Path) -> None:
    """Every file part writes ``folder/<its key>`` (collective where the part is)."""
    for key, part in parts.items():
        if is_file_part(part):
            part.save_files(Path(folder) / key)


def load_files(parts: dict[str, Stateful], folder: Path) -> None:
    for key, part in parts.items():
        if is_file_part(part):
            part.load_files(Path(folder) / key)


class DeepSpeedFiles:
    """The DeepSpeed engine's own checkpoint (its fp32 partitions and momentum) as a file
    part. ``save_checkpoint`` is collective; ZeRO-1/2 checkpoints load only on the world
    size they were written with."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # all of it is in the files

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def save_files(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine", save_latest=False)

    def load_files(self, folder: Path) -> None:
        """After the AST state (the module weights it also loads are the same values)."""
        if not folder.is_dir():
            raise CheckpointError(
                f"checkpoint {folder.parent} has no {folder.name}/ folder: it was written by "
                "engine=ddp and cannot restore DeepSpeed's optimizer state"
            )
        self.engine.load_checkpoint(str(folder), tag="engine")


def deepspeed_part(engine: Any) -> DeepSpeedFiles | None:
    """The file part of a DeepSpeed engine; None for anything else (engine=ddp)."""
    if engine is None or not hasattr(engine, "save_checkpoint"):
        return None
    return DeepSpeedFiles(engine)


# --------------------------------------------------------------------------- saving


def _meta(config: RunConfig, step: int, world_size: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        **_identity(config),
        "engine": config.engine.name,
        "torch": torch.__version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_as_dict(config),
    }


class ReusedStagingStager(AsyncStager):
    """Stages an async save into CPU buffers kept from the previous save: on CPU, what an
    async save blocks on is mostly page faults of fresh memory, so reuse makes it a plain
    memcpy. Unlike DCP's cached ``BlockingAsyncStager`` the state's structure may change
    between saves (the GC buffer appears, the mask-update log grows): a new path, shape or
    dtype gets a new buffer. ``Checkpointer.save`` waits for the previous write first.
    """

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, ...], torch.Tensor] = {}

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return self._stage(state_dict, ())

    def _stage(self, value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: self._stage(v, (*path, str(k))) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        buf = self._buffers.get(path)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            # pinned host memory when the state is on a GPU: faster device-to-host copies
            pin = value.device.type == "cuda"
            buf = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buf
        return buf.copy_(value)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` copies before it returns."""


class Checkpointer:
    """Decides when to save, writes ``step-<N>`` atomically (collective), keeps the newest
    K. An async save is written and checksummed in a thread and renamed at a later step
    boundary or ``wait()``. A save failing with an OSError (a full disk) removes its
    ``.tmp-`` folder and raises a one-line CheckpointError; other errors keep their traceback.
    """

    # DCP's writer, a class attribute so that a test can substitute a failing one
    writer_class: type[FileSystemWriter] = FileSystemWriter

    def __init__(self, owner: CheckpointOwner) -> None:
        self.owner = owner
        self.cfg = owner.config.checkpoint
        self.run_dir = Path(owner.config.run_dir)
        self.dist = owner.dist
        self.last_save_time = time.monotonic()
        self.last_saved_step: int | None = None
        self.last_committed: Path | None = None  # rank 0: verified by its own checksums
        self.checksum_seconds = 0.0  # rank 0, last commit: reading + CRC of the files
        self._pending: tuple[Future, Path, Path, dict, int] | None = None
        self._group = None
        self._stager = ReusedStagingStager()
        if self.dist.distributed:
            # a gloo group of its own: async writes run in a thread, beside training's
            # collectives on the default group; gloo also serves CPU-staged tensors.
            self._group = dist.new_group(backend="gloo")

    @property
    def minutes_due(self) -> bool:
        m = self.cfg.every_minutes
        return bool(m) and time.monotonic() - self.last_save_time >= 60.0 * m

    def steps_due(self, step: int) -> bool:
        n = self.cfg.every_steps
        return bool(n) and step % n == 0

    def save(self, block: bool = False) -> Path:
        """Write the owner's parts at its current step (all ranks call this)."""
        step = self.owner.step
        self.finish_pending()
        final = checkpoint_dir(self.run_dir) / f"{STEP_PREFIX}{step}"
        tmp = checkpoint_dir(self.run_dir) / f"{TMP_PREFIX}{step}"
        made: OSError | None = None
        if self.dist.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                made = e
        if not self._all_ok(made is None):  # (a barrier too) every rank stops if rank 0 could not
            self._abort(step, tmp, made or CheckpointError(f"rank 0 could not create {tmp}"))
        parts = self.owner.stateful_parts()
        state = dcp_state(parts)
        meta = _meta(self.owner.config, step, self.dist.world_size)
        start = time.perf_counter()
        if self.cfg.async_save and not block:
            try:
                save_files(parts, tmp)  # DeepSpeed's own save is synchronous
                fut = dcp.async_save(
                    state,
                    checkpoint_id=str(tmp),
                    storage_writer=self.writer_class(str(tmp)),
                    process_group=self._group,
                    async_stager=self._stager,
                    no_dist=not self.dist.distributed,
                )
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                self._abort(step, tmp, e)
            if not isinstance(fut, Future):  # AsyncSaveResponse (custom stagers)
                fut = fut.upload_completion
            if self.dist.is_main:  # checksums in the writer's thread, once every rank wrote
                fut = _then(fut, lambda: self._checksums(tmp))
            self._pending = (fut, tmp, final, meta, step)
            log.info(
                "step %d: async checkpoint staged in %.3f s", step, time.perf_counter() - start
            )
        else:
            try:
                dcp.save(
                    state,
                    checkpoint_id=str(tmp),
                    storage_writer=self.writer_class(str(tmp)),
                    process_group=self._group,
                    no_dist=not self.dist.distributed,
                )
                save_files(parts, tmp)
            except (Exception, CheckpointException) as e:
                self._abort(step, tmp, e)
            self._barrier()
            err: BaseException | None = None
            if self.dist.is_main:
                try:
                    self._commit(tmp, final, meta, self._checksums(tmp))
                except (Exception, CheckpointException) as e:
                    err = e
            if not self._all_ok(err is None):  # every rank learns that rank 0's commit failed
                why = f"rank 0 could not commit the checkpoint of step {step} (see its error)"
                self._abort(step, tmp, err or CheckpointError(why))
            log.info(
                "step %d: checkpoint %s written in %.3f s", step, final, time.perf_counter() - start
            )
        self.last_save_time = time.monotonic()
        self.last_saved_step = step
        return final

    def finish_pending(self, wait: bool = True) -> None:
        """Commit a finished async save (rank 0); a failed one raises here."""
        if self._pending is None:
            return
        fut, tmp, final, meta, step = self._pending
        if not wait and not fut.done():
            return
        self._pending = None
        try:
            files = fut.result()
            if self.dist.is_main:
                self._commit(tmp, final, meta, files)
        except (Exception, CheckpointException) as e:
            self._abort(step, tmp, e)

    def wait(self) -> None:
        """Block until an async save is on disk and committed, on every rank."""
        self.finish_pending(wait=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.dist.distributed:
            dist.barrier(group=self._group)

    def _all_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (one all-reduce on the checkpoint group)."""
        if not self.dist.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return not bool(flag.item())

    def _checksums(self, tmp: Path) -> dict[str, dict]:
        """Size and crc32c of every file written so far (rank 0, after every rank wrote)."""
        start = time.perf_counter()
        files = checksum_files(tmp, skip=(MANIFEST_FILE, META_FILE))
        self.checksum_seconds = time.perf_counter() - start
        return files

    def _commit(self, tmp: Path, final: Path, meta: dict, files: dict[str, dict]) -> None:
        """meta.json, then manifest.json (both fsynced), then the rename (rank 0)."""
        if not (tmp / ".metadata").is_file():
            raise CheckpointError(f"DCP wrote no .metadata into {tmp}: the save did not finish")
        write_synced(tmp / META_FILE, json.dumps({**meta, "manifest": MANIFEST_FILE}, indent=1))
        start = time.perf_counter()
        size, crc = file_crc32c(tmp / META_FILE)
        write_manifest(tmp, {**files, META_FILE: {"size": size, CHECKSUM: crc}})
        self.checksum_seconds += time.perf_counter() - start
        _fsync_dir(tmp)
        old = None
        if final.exists():  # a re-save of the same step (resumed run): replace it
            old = final.with_name(f"{TMP_PREFIX}{final.name[len(STEP_PREFIX) :]}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if old is not None:  # put the previous one back
                old.rename(final)
            raise
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.last_committed = final
        self._prune(final)

    def _prune(self, committed: Path) -> None:
        """Keep the newest ``keep`` checkpoints, and always the one just committed: a
        damaged newer one left by an earlier run (which resume skipped) must not push
        the only intact checkpoint out."""
        keep = max(1, self.cfg.keep)
        found = complete_checkpoints(self.run_dir)
        for _, p in found[:-keep]:
            if p != committed:
                shutil.rmtree(p, ignore_errors=True)
        # leftovers of crashed writes (no save is in flight on rank 0 at this point)
        for p in checkpoint_dir(self.run_dir).glob(f"{TMP_PREFIX}*"):
            if self._pending is None or p != self._pending[1]:
                shutil.rmtree(p, ignore_errors=True)

    def _abort(self, step: int, tmp: Path, exc: BaseException) -> NoReturn:
        """Remove a failed save's folder (rank 0); an OSError becomes a CheckpointError."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(exc)
        if cause is None:
            raise exc
        where = checkpoint_dir(self.run_dir)
        newest = self._newest_intact_or_none()
        keep = (
            f"the newest intact checkpoint is {newest} (the same command resumes from it)"
            if newest is not None
            else "there is no earlier checkpoint in this run_dir"
        )
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space on the disk of {where} or set run_dir to a disk with room"
        else:
            fix = f"check that {where} is writable, or set run_dir to another disk"
        raise CheckpointError(
            f"saving the checkpoint of step {step} failed: {_describe(cause)}; removed its "
            f"unfinished folder {tmp}; {keep}. Fix: {fix}, then run the same command"
        ) from exc

    def _newest_intact_or_none(self) -> Path | None:
        """For the failure message (rank 0 verifies; other ranks only list)."""
        if self.last_committed is not None and self.last_committed.is_dir():
            return self.last_committed
        if not self.dist.is_main:
            found = complete_checkpoints(self.run_dir)
            return found[-1][1] if found else None
        try:
            return _newest_intact(self.run_dir, warn=False)
        except CheckpointError:
            return None

    def close(self) -> None:
        self.wait()


def _then(fut: Future, fn: Callable[[], Any]) -> Future:
    """A future of ``fn()``, run in the thread that completes ``fut`` (if it succeeded)."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            f.result()
            out.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException included
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind a failed save: itself, one that DCP's CheckpointException
    carries from any rank, or one in its cause chain."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            todo += [w[0] for w in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _describe(e: OSError) -> str:
    """``No space left on device (ENOSPC) writing /x/__0_0.distcp`` from an OSError."""
    name = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or str(e)
    out = f"{text} ({name})" if name else text
    return f"{out} writing {e.filename}" if e.filename else out


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- loading


def read_checkpoint(
    path: Path, parts: dict[str, Stateful], config: RunConfig, dist_info: DistInfo
) -> tuple[dict[str, Any], dict]:
    """The saved state of ``parts`` (``dcp_state``'s form) and meta.json, or a
    CheckpointError before any part is touched. The caller installs it, then ``load_files``."""
    path = Path(path)
    meta = read_meta(path)
    check_compatible(meta, config, path)
    saved = read_dcp_metadata(path).state_dict_metadata
    state = {}
    for key, part in parts.items():
        if is_file_part(part):
            continue
        if isinstance(part, torch.nn.Module):
            _check_module_fits(key, part, saved, path)
        target = _target(key, part.state_dict(), saved, dist_info.device)
        if target is not None:
            state[key] = target
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            process_group=None,
            no_dist=not dist_info.distributed,
        )
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable: {e}") from e
    return state, meta


def _target(key: str, current: Any, saved: dict, device: torch.device) -> Any:
    """What DCP loads part ``key`` into (None: nothing saved): the part's own tensors where
    shape and dtype agree, else new ones sized from the checkpoint (the GC buffer, momentum,
    the mask-update log appear or grow during a run); tensors it lacks are left out."""
    mine = {n: md for n, md in saved.items() if n == key or n.startswith(f"{key}.")}
    if not mine:
        return None

    def fresh(md: Any) -> torch.Tensor:
        return torch.zeros(tuple(md.size), dtype=md.properties.dtype, device=device)

    # a copy of the part's dicts; its dicts and tensors by DCP name (keys joined by ".")
    dicts: dict[str, dict] = {}
    leaves: dict[str, tuple[dict, str]] = {}

    def copy(d: dict, prefix: str, out: dict) -> dict:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                dicts[name] = out[k] = {}
                copy(v, f"{name}.", out[k])
            else:
                out[k] = v
                leaves[name] = (out, k)
        return out

    root = copy({key: current}, "", {})  # a part whose state is one tensor is a leaf here
    for name, (parent, k) in leaves.items():
        md = mine.get(name)
        if md is None or not hasattr(md, "size"):
            del parent[k]
        elif tuple(parent[k].shape) != tuple(md.size) or parent[k].dtype != md.properties.dtype:
            parent[k] = fresh(md)
    for name, md in mine.items():
        if name in leaves or not hasattr(md, "size"):
            continue
        # the innermost dict of the part that holds it: optim's flat names, gc.prev's
        # numbered tensors, an RNG this device does not have
        owner = max((d for d in dicts if name.startswith(f"{d}.")), key=len, default=None)
        if owner is not None:
            dicts[owner][name[len(owner) + 1 :]] = fresh(md)
    return root.get(key)


def _check_module_fits(key: str, module: torch.nn.Module, saved: dict, path: Path) -> None:
    """Name the first few tensors of a module part whose shape differs or that the
    checkpoint lacks (DCP's own error does not)."""
    bad = []
    for name, v in module.state_dict().items():
        md = saved.get(f"{key}.{name}")
        if md is None:
            bad.append(f"{key}.{name} missing")
        elif hasattr(md, "size") and tuple(md.size) != tuple(v.shape):
            bad.append(f"{key}.{name}: checkpoint {tuple(md.size)}, model {tuple(v.shape)}")
    if bad:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({len(bad)} tensors differ: "
            f"{'; '.join(bad[:4])}{' …' if len(bad) > 4 else ''})"
        )
