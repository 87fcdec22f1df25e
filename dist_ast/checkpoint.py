"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DESIGN §4).

One checkpoint is a folder ``run_dir/checkpoints/step-<N>/`` holding DCP's shard files
(``__<rank>_<i>.distcp``), DCP's ``.metadata`` and our ``meta.json`` (format version,
step, world size, model name, sub-net count, the resolved config). It is written under
``.tmp-step-<N>`` and renamed by rank 0 once every rank has written its shards, so a
folder named ``step-<N>`` is always complete: a crash mid-write leaves a ``.tmp-`` folder
that resume ignores (and the next save clears).

What is saved (everything a step touches, so a resumed run is bit-identical on CPU):
model (sparse weights, every BatchNorm set, the masks of all sub-nets as buffers),
MaskedSGD momentum, the step (the LR and the sparsity schedule are pure functions of
it), the GC buffer and counters, the FLOPs counters, the mask-update log, the GradScaler,
the RNG states of every rank (torch, CUDA, Python, NumPy) and the loader position of
every rank. Everything in the DCP state is a tensor: DCP would ``torch.load`` any other
object with ``weights_only=False``; and its ``.metadata`` pickle is read with an
unpickler that accepts DCP's own metadata classes only. So loading a checkpoint never
runs arbitrary code.

Resuming on another world size: DCP reshards the (replicated) model and optimizer;
each rank takes its own RNG state when the old run had that rank, and the loader
position is recomputed from the step (the global batch is the same, so the number of
batches per epoch is too).

DeepSpeed (``engine=deepspeed``): the engine saves its own format (``engine_save``
below) beside our AST state, which is written generically from the SubnetModel.

Integrity: before the rename, rank 0 writes ``manifest.json``, the size and crc32c of
every file in the folder (DCP's shards and ``.metadata``, ``meta.json``, DeepSpeed's
files), and fsyncs it. A folder can be named ``step-<N>`` and still be damaged (a full
disk, a dying node or a copy can cut or change a file later), so ``resume=auto`` checks
the newest checkpoint against its manifest and falls back to the newest intact one, and
an explicit ``resume=<path>`` that does not match is an error. Checkpoints written before
manifests existed resume unchecked (with a log line). A save that fails (disk full)
removes its ``.tmp-`` folder and stops the run with a CheckpointError naming the newest
intact checkpoint; an async save's failure is raised at the next step boundary.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import mmap
import os
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

import crc32c
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager

from dist_ast.config import RunConfig, config_as_dict
from dist_ast.errors import EXIT_CHECKPOINT, ExpectedError

if TYPE_CHECKING:
    from dist_ast.train import Trainer

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load that it assumes one process: we pass
# no_dist=True on purpose there.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or uninitialized",
    category=UserWarning,
)

FORMAT_VERSION = 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
CHECKSUM = "crc32c"  # hardware CRC (SSE4.2 / ARMv8): a few GB/s, ~5 % of a ResNet-50 save
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"


class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint that cannot be resumed from, or a save that failed; the message names
    the folder, why, and what to do."""

    exit_code = EXIT_CHECKPOINT
    kind = "checkpoint error"
    same_on_every_rank = True


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest (or lack one it needs)."""

    def __init__(self, folder: Path, file: str, why: str) -> None:
        self.folder, self.file, self.why = Path(folder), file, why
        super().__init__(f"checkpoint {folder} is damaged: {file} {why}")


# --------------------------------------------------------------------------- layout


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{STEP_PREFIX}{step}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``run_dir``, oldest first.

    Complete = named ``step-<N>`` (renamed only after every rank finished) with both
    DCP's ``.metadata`` and our ``meta.json``; ``.tmp-*`` folders are never listed.
    """
    root = checkpoint_dir(run_dir)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        tail = p.name[len(STEP_PREFIX) :]
        if p.name.startswith(STEP_PREFIX) and tail.isdigit() and p.is_dir():
            if (p / ".metadata").is_file() and (p / META_FILE).is_file():
                out.append((int(tail), p))
    return sorted(out)


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


def resolve_resume(config: RunConfig) -> Path | None:
    """The checkpoint this run starts from: ``checkpoint.resume`` = auto (the newest
    intact one in run_dir, or none), never, or a path to a ``step-<N>`` folder (which
    must be intact). Reads every file of the chosen checkpoint once (its checksums)."""
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
    """The newest checkpoint that matches its manifest (or predates manifests); None
    when run_dir has none at all. With ``warn``, one warning per damaged newer one; a
    CheckpointError when checkpoints exist but every one is damaged."""
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


# --------------------------------------------------------------------------- integrity


def file_crc32c(path: Path) -> tuple[int, str]:
    """(size, crc32c as 8 hex digits) of a file, read through mmap: no copy into Python
    memory, and the CRC runs without the GIL (an async save checksums in its thread)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, f"{0:08x}"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return size, f"{crc32c.crc32c(m):08x}"


def checksum_files(folder: Path, skip: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict]:
    """{relative posix path: {"size", "crc32c"}} of every file under ``folder``."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in skip:
            size, crc = file_crc32c(p)
            out[rel] = {"size": size, CHECKSUM: crc}
    return out


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync a small file (meta.json, manifest.json): it is on disk before the
    folder is renamed to ``step-<N>``."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, files: dict[str, dict] | None = None) -> dict:
    """Write ``folder/manifest.json`` (``files`` from ``checksum_files``, computed now when
    not given); returns the manifest."""
    folder = Path(folder)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "checksum": CHECKSUM,
        "files": checksum_files(folder) if files is None else files,
    }
    _write_synced(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_checkpoint(folder: Path) -> bool:
    """Check every file of a checkpoint against its manifest: True when it matches, False
    for a checkpoint written before manifests (meta.json does not name one; only
    ``.metadata`` and ``meta.json`` are checked to exist). Raises DamagedCheckpointError
    naming the first missing, short or changed file."""
    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except FileNotFoundError:
            raise DamagedCheckpointError(folder, META_FILE, "is missing") from None
        except (OSError, ValueError) as e:
            raise DamagedCheckpointError(folder, META_FILE, f"does not parse ({e})") from None
        if not isinstance(meta, dict) or meta.get("manifest"):
            raise DamagedCheckpointError(folder, MANIFEST_FILE, "is missing")
        if not (folder / ".metadata").is_file():
            raise DamagedCheckpointError(folder, ".metadata", "is missing")
        return False
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        entries = [(str(k), int(v["size"]), str(v[CHECKSUM])) for k, v in files.items()]
        if manifest["checksum"] != CHECKSUM:
            raise ValueError(f"checksum {manifest['checksum']!r}, expected {CHECKSUM!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(folder, MANIFEST_FILE, f"does not parse ({e})") from None
    for need in (".metadata", META_FILE):
        if need not in files:
            raise DamagedCheckpointError(folder, MANIFEST_FILE, f"does not list {need}")
    for rel, size, _ in entries:  # the cheap checks first: missing or short files
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise DamagedCheckpointError(folder, MANIFEST_FILE, f"lists a foreign path {rel!r}")
        p = folder / rel
        if not p.is_file():
            raise DamagedCheckpointError(folder, rel, "is missing")
        got = p.stat().st_size
        if got != size:
            raise DamagedCheckpointError(
                folder, rel, f"has {got} bytes, its manifest says {size} (cut short or changed)"
            )
    for rel, _, want in entries:
        _, got = file_crc32c(folder / rel)
        if got != want:
            raise DamagedCheckpointError(
                folder, rel, f"differs from its manifest ({CHECKSUM} {got}, recorded {want})"
            )
    return True


# --------------------------------------------------------------------------- safe reading

_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided etc. by name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "Path"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.storage", "_load_from_bytes"),
    ("enum", "Enum"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata (its dataclasses, torch.Size, dtypes) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in ("memory_format", "layout"):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a DCP .metadata file holds only "
            "torch.distributed.checkpoint metadata"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader, with the ``.metadata`` pickle restricted to DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - DCP's type
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint folder, checked for format; CheckpointError if bad."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or not a dist_ast checkpoint: {META_FILE} is "
            "missing (delete the folder or point checkpoint.resume elsewhere)"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: {f} does not parse ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format version {got!r}; this dist_ast reads version "
            f"{FORMAT_VERSION}"
        )
    return meta


def check_resume(config: RunConfig) -> Path | None:
    """The checkpoint to resume from, checked (its files against the manifest, meta.json,
    model, sub-nets, DCP metadata) before anything is built or written; None for a fresh
    start. Under torchrun rank 0 reads the checksums and every rank gets its choice (one
    read of the files, one warning, and the same checkpoint on every rank)."""
    path = _on_rank0(lambda: resolve_resume(config))
    if path is None:
        return None
    meta = read_meta(path)
    check_compatible(meta, config, path)
    _read_dcp_metadata(path)
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


def _read_dcp_metadata(path: Path):  # noqa: ANN202 - DCP's Metadata
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: DCP's .metadata is missing"
        ) from None
    except Exception as e:  # a truncated or foreign pickle
        raise CheckpointError(
            f"checkpoint {path} is corrupted: .metadata does not load ({e})"
        ) from e


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics.jsonl records after ``step`` (the killed run's tail, which the resumed
    run writes again); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut by kill -9
            dropped += 1
            continue
        if rec_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in keep))
        tmp.replace(path)
        log.info("metrics.jsonl: dropped %d records after step %d", dropped, step)
    return dropped


def check_compatible(meta: dict, config: RunConfig, path: Path) -> None:
    """Refuse a checkpoint of another model, sub-net count, sparsities or mode."""
    want = {
        "model": config.model.name,
        "num_subnets": config.ast.num_subnets,
        "sparsities": [float(s) for s in config.ast.sparsities],
        "mode": config.ast.mode,
        "num_classes": config.model.num_classes,
    }
    wrong = [
        f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}"
        for k, v in want.items()
        if meta.get(k) != v
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} does not match this run ({'; '.join(wrong)}). Use a run_dir "
            "of its own for a different model/sub-nets, or checkpoint.resume=never to start "
            "fresh"
        )


# --------------------------------------------------------------------------- state <-> tensors


def _int_tensor(v: int) -> torch.Tensor:
    """A Python int of any size as int64 [hi, lo] (FLOPs counters can pass 2**63)."""
    hi, lo = divmod(int(v), 1 << 32)
    return torch.tensor([hi, lo], dtype=torch.int64)


def _int_value(t: torch.Tensor) -> int:
    hi, lo = (int(x) for x in t.tolist())
    return (hi << 32) + lo


def _python_rng_tensor() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    g = [0, 0] if gauss is None else [1, int(np.float64(gauss).view(np.int64))]
    return torch.tensor([version, *internal, *g], dtype=torch.int64)


def _set_python_rng(t: torch.Tensor) -> None:
    v = t.tolist()
    gauss = float(np.int64(v[-1]).view(np.float64)) if v[-2] else None
    random.setstate((v[0], tuple(v[1:-2]), gauss))


def _numpy_rng_tensor() -> torch.Tensor:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937"
    extra = np.array([pos, has_gauss, np.float64(cached).view(np.int64)], dtype=np.int64)
    return torch.from_numpy(np.concatenate([keys.astype(np.int64), extra]))


def _set_numpy_rng(t: torch.Tensor) -> None:
    a = t.numpy()
    keys = a[:-3].astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, int(a[-3]), int(a[-2]), float(a[-1:].view(np.float64)[0]))
    )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (no pickles)."""
    out = {
        "torch": torch.get_rng_state(),
        "python": _python_rng_tensor(),
        "numpy": _numpy_rng_tensor(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    _set_python_rng(state["python"])
    _set_numpy_rng(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """MaskedSGD momentum by parameter name (names survive resharding; ids do not)."""
    out = {}
    for name, p in trainer.model.named_parameters():
        st = trainer.optimizer.state.get(p, {})
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{key} is not a tensor: {type(v)}")
            out[f"{name}.{key}"] = v
    return out


def _flat_ints(d: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: _int_tensor(v) for k, v in d.items()}


def _mask_updates_tensor(updates: list[dict]) -> torch.Tensor:
    rows = [[u["step"], u["subnet"], u["reset"]] for u in updates]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """The nested DCP state of a Trainer: tensors only, this rank's keys named by rank."""
    r = trainer.dist.rank
    gc = trainer.gc
    state: dict[str, Any] = {
        "model": trainer.model.state_dict(),
        "optim": _optimizer_state(trainer),
        "clock": {"step": _int_tensor(trainer.step)},
        "gc": {
            "steps_checked": _int_tensor(gc.steps_checked),
            "conflicts": _int_tensor(gc.conflicts),
            "prev": {str(i): t for i, t in enumerate(gc.prev or [])},
        },
        "flops": _flat_ints(trainer.flops.state_dict()),
        "mask_updates": _mask_updates_tensor(trainer.mask_updates),
        f"rank{r}": {
            "rng": rng_state(trainer.dist.device),
            "loader": _flat_ints(trainer.loaders.train.state_dict()),
        },
    }
    if getattr(trainer, "guard", None) is not None:  # train.nonfinite's skip counters
        state["nonfinite"] = _flat_ints(trainer.guard.state_dict())
    if trainer.scaler is not None:
        sc = trainer.scaler.state_dict()
        state["scaler"] = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in sc.items()}
    return state


# --------------------------------------------------------------------------- saving


def _engine(trainer: Trainer) -> Any:
    """The DeepSpeed engine when engine=deepspeed (``trainer.sync.engine``), else None."""
    return getattr(getattr(trainer, "sync", None), "engine", None)


def engine_save(trainer: Trainer, folder: Path) -> None:
    """The engine's own checkpoint beside the AST state (engine=deepspeed): its flat fp32
    partitions and their momentum live in DeepSpeed's format, ``folder/deepspeed/engine``.
    ``save_checkpoint`` is collective: every rank calls it (and it ends in a barrier)."""
    engine = _engine(trainer)
    if engine is not None and hasattr(engine, "save_checkpoint"):
        engine.save_checkpoint(str(folder / "deepspeed"), tag="engine", save_latest=False)


def engine_load(trainer: Trainer, folder: Path) -> None:
    """Restore the engine's optimizer partitions after the AST state (the module weights
    it also loads are the same values). Resharding to another world size is DeepSpeed's:
    ZeRO-1/2 checkpoints load on the world size they were written with."""
    engine = _engine(trainer)
    if engine is None or not hasattr(engine, "load_checkpoint"):
        return
    if not (folder / "deepspeed").is_dir():
        raise CheckpointError(
            f"checkpoint {folder} has no deepspeed/ folder: it was written by engine=ddp and "
            "cannot restore DeepSpeed's optimizer state"
        )
    engine.load_checkpoint(str(folder / "deepspeed"), tag="engine")
    # torch's Optimizer.load_state_dict (which DeepSpeed calls on the client optimizer)
    # replaces the param_group dicts: re-link PartitionMaskedSGD's sparse group (the
    # partitions GC and the masked update run on), or GC would stop after a resume.
    opt = getattr(getattr(trainer, "sync", None), "optimizer", None)
    if opt is not None and hasattr(opt, "_sparse_group") and opt.param_groups:
        opt._sparse_group = opt.param_groups[0]


def _meta(trainer: Trainer) -> dict:
    c = trainer.config
    return {
        "format_version": FORMAT_VERSION,
        "step": trainer.step,
        "world_size": trainer.dist.world_size,
        "model": c.model.name,
        "num_classes": c.model.num_classes,
        "num_subnets": c.ast.num_subnets,
        "sparsities": [float(s) for s in c.ast.sparsities],
        "mode": c.ast.mode,
        "engine": c.engine.name,
        "torch": torch.__version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_as_dict(c),
    }


class ReusedStagingStager(AsyncStager):
    """Stages the state for an async save into CPU memory kept from the previous save.

    Most of what an async save blocks on, on CPU, is allocating fresh memory for the
    staged copy (page faults cost more than the copy itself); reusing the buffers makes
    the blocking part a plain memcpy. Unlike DCP's ``BlockingAsyncStager(cache_...)``
    it allows the state's structure to change between saves (the GC buffer appears after
    the first step, the mask-update log grows): a tensor whose path, shape or dtype is new
    gets a new buffer. Costs one resident CPU copy of the state between saves (pinned
    when the state is on a GPU). A buffer is reused only after the previous write has
    finished (``Checkpointer.save`` waits).
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
    """Decides when to save, writes ``step-<N>`` atomically, keeps the newest K.

    Saves are collective: every rank calls ``save`` at the same step. With
    ``checkpoint.async_save`` the state is staged to CPU memory (kept between saves, see
    :class:`ReusedStagingStager`) and written by a
    background thread over a gloo group of its own (so it never interleaves with the
    training collectives); rank 0 checksums the files in that thread too, and renames the
    folder when both have finished, at a later step boundary or at ``wait()``.

    A save that fails (an OSError such as a full disk, in DCP's writer, DeepSpeed's save
    or the commit) removes its ``.tmp-`` folder and raises a one-line CheckpointError;
    other failures are re-raised as they are (a bug keeps its traceback).
    """

    # DCP's writer, a class attribute so that a test can substitute a failing one
    writer_class: type[FileSystemWriter] = FileSystemWriter

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.cfg = trainer.config.checkpoint
        self.run_dir = Path(trainer.config.run_dir)
        self.dist = trainer.dist
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
        """Write the trainer's state at its current step (all ranks call this)."""
        t = self.trainer
        step = t.step
        self.finish_pending()
        final, tmp = (
            step_dir(self.run_dir, step),
            checkpoint_dir(self.run_dir) / f"{TMP_PREFIX}{step}",
        )
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
        state = trainer_state(t)
        meta = _meta(t)
        start = time.perf_counter()
        if self.cfg.async_save and not block:
            try:
                engine_save(t, tmp)  # DeepSpeed's own save is synchronous
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
                engine_save(t, tmp)
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
        """Commit a finished async save (rank 0 renames; others just drop the future); a
        failed one raises here, at the step boundary after the failure."""
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
        _write_synced(tmp / META_FILE, json.dumps({**meta, "manifest": MANIFEST_FILE}, indent=1))
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
        """A failed save: remove its folder (rank 0), then raise a one-line CheckpointError
        for an OSError (what failed, the folder, the newest intact checkpoint, the fix),
        or re-raise anything else unchanged."""
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
        """For the failure message: the checkpoint this process committed last, else the
        newest on disk that verifies (rank 0 reads it; other ranks only list)."""
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
    """A future of ``fn()``, run in the thread that completes ``fut`` once it succeeded
    (its exception otherwise)."""
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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def _targets(trainer: Trainer, saved: dict, saved_world: int) -> dict[str, Any]:
    """Tensors for DCP to load into, shaped by this run and by what the checkpoint holds
    (momentum and the GC buffer exist only once a step ran)."""
    t = trainer
    r = t.dist.rank
    keys = set(saved)
    # GC's g_prev: one tensor per sparse layer (DDP) or per flat fp32 partition
    # (DeepSpeed), so its shapes come from the checkpoint; the step checks them
    gc_prev = {
        k[len("gc.prev.") :]: torch.zeros(tuple(saved[k].size), dtype=saved[k].properties.dtype)
        for k in keys
        if k.startswith("gc.prev.")
    }
    if sorted(gc_prev, key=int) != [str(i) for i in range(len(gc_prev))]:
        raise CheckpointError("the checkpoint's GC buffer is incomplete")
    gc_prev = {k: v.to(t.dist.device) for k, v in gc_prev.items()}

    optim: dict[str, torch.Tensor] = {}
    params = dict(t.model.named_parameters())
    for k in keys:
        if k.startswith("optim."):
            name, slot = k[len("optim.") :].rsplit(".", 1)
            if name not in params:
                raise CheckpointError(
                    f"the checkpoint has optimizer state for {name}, which this model lacks"
                )
            optim[f"{name}.{slot}"] = torch.zeros_like(params[name])

    state: dict[str, Any] = {
        "model": t.model.state_dict(),
        "optim": optim,
        "clock": {"step": torch.zeros(2, dtype=torch.int64)},
        "gc": {
            "steps_checked": torch.zeros(2, dtype=torch.int64),
            "conflicts": torch.zeros(2, dtype=torch.int64),
            "prev": gc_prev,
        },
        "flops": {k: torch.zeros(2, dtype=torch.int64) for k in t.flops.state_dict()},
    }
    if any(k.startswith("nonfinite.") for k in keys):  # absent before train.nonfinite
        state["nonfinite"] = {k: torch.zeros(2, dtype=torch.int64) for k in t.guard.state_dict()}
    same_rank = f"rank{r}.rng.torch" in keys
    if same_rank:
        rng = {k.split(".", 2)[2]: None for k in keys if k.startswith(f"rank{r}.rng.")}
        cur = rng_state(t.dist.device)
        state[f"rank{r}"] = {
            "rng": {k: torch.zeros_like(cur[k]) for k in rng if k in cur},
        }
        if saved_world == t.dist.world_size:
            loader_keys = [k.split(".", 2)[2] for k in keys if k.startswith(f"rank{r}.loader.")]
            state[f"rank{r}"]["loader"] = {
                k: torch.zeros(2, dtype=torch.int64) for k in loader_keys
            }
    if t.scaler is not None and any(k.startswith("scaler.") for k in keys):
        state["scaler"] = {k: torch.zeros((), dtype=torch.float64) for k in t.scaler.state_dict()}
    return state


def load_checkpoint(trainer: Trainer, path: Path) -> dict:
    """Restore every part of the trainer from ``path``; returns its meta.json.

    Raises CheckpointError, before touching the trainer where it can, when the folder
    is incomplete, corrupted or of another model."""
    path = Path(path)
    t = trainer
    meta = read_meta(path)
    check_compatible(meta, t.config, path)
    md = _read_dcp_metadata(path)
    saved = md.state_dict_metadata
    _check_shapes(t, saved, path)

    state = _targets(t, saved, int(meta["world_size"]))
    # mask_updates has a data-dependent length: size its target from the metadata
    mu = saved.get("mask_updates")
    n_updates = int(mu.size[0]) if mu is not None else 0
    state["mask_updates"] = torch.zeros((n_updates, 3), dtype=torch.int64)
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            process_group=None,
            no_dist=not t.dist.distributed,
        )
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable: {e}") from e

    # install what could not be loaded in place
    params = dict(t.model.named_parameters())
    for key, v in state["optim"].items():
        name, slot = key.rsplit(".", 1)
        t.optimizer.state[params[name]][slot] = v
    g = state["gc"]
    t.gc.steps_checked = _int_value(g["steps_checked"])
    t.gc.conflicts = _int_value(g["conflicts"])
    t.gc.prev = [g["prev"][str(i)] for i in range(len(g["prev"]))] or None
    t.flops.load_state_dict({k: _int_value(v) for k, v in state["flops"].items()})
    if "nonfinite" in state:
        t.guard.load_state_dict({k: _int_value(v) for k, v in state["nonfinite"].items()})
    t.flops.refresh(t.model)
    t.mask_updates = [
        {"step": int(a), "subnet": int(b), "reset": int(c)}
        for a, b, c in state["mask_updates"].tolist()
    ]
    t.step = _int_value(state["clock"]["step"])
    if "scaler" in state and t.scaler is not None:
        sc = {k: v.item() for k, v in state["scaler"].items()}
        sc["_growth_tracker"] = int(sc.get("_growth_tracker", 0))  # an int in GradScaler
        t.scaler.load_state_dict(sc)
    mine = state.get(f"rank{t.dist.rank}", {})
    if "rng" in mine:
        set_rng_state(mine["rng"], t.dist.device)
    else:
        log.warning(
            "checkpoint %s has no RNG state for rank %d (saved with %d ranks): this rank keeps "
            "its seeded RNG",
            path,
            t.dist.rank,
            meta["world_size"],
        )
    loader = t.loaders.train
    if "loader" in mine:
        loader.load_state_dict({k: _int_value(v) for k, v in mine["loader"].items()})
    else:
        # another world size: the same global batch gives the same batches per epoch,
        # so the position follows from the step.
        n = len(loader)
        pos = dict(loader.state_dict())
        pos.update(epoch=t.step // n, batches_consumed=t.step % n)
        loader.load_state_dict(pos)
        log.info("loader position recomputed from step %d for %d ranks", t.step, t.dist.world_size)
    engine_load(t, path)
    log.info("resumed from %s (step %d)", path, t.step)
    return meta


def _check_shapes(trainer: Trainer, saved: dict, path: Path) -> None:
    """Name the first few model tensors whose shape differs (DCP's own error does not)."""
    bad = []
    for name, v in trainer.model.state_dict().items():
        md = saved.get(f"model.{name}")
        if md is None:
            bad.append(f"model.{name} missing")
        elif hasattr(md, "size") and tuple(md.size) != tuple(v.shape):
            bad.append(f"model.{name}: checkpoint {tuple(md.size)}, model {tuple(v.shape)}")
    if bad:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({len(bad)} tensors differ: "
            f"{'; '.join(bad[:4])}{' …' if len(bad) > 4 else ''})"
        )
