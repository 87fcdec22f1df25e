"""Reading checkpoints safely: errors, file names, integrity checks (``manifest.json``:
size and crc32c of every file) and DCP's reader with ``.metadata`` unpickling only DCP's
own classes, so loading never runs arbitrary code. Imports nothing above errors.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import crc32c
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from dist_ast.errors import EXIT_CHECKPOINT, ExpectedError

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


def file_crc32c(path: Path) -> tuple[int, str]:
    """(size, crc32c as 8 hex digits), read through mmap: no copy into Python memory, and
    the CRC runs without the GIL (an async save checksums in its thread)."""
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


def write_synced(path: Path, text: str) -> None:
    """Write and fsync a small file: it is on disk before the folder is renamed."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, files: dict[str, dict] | None = None) -> dict:
    """Write ``folder/manifest.json`` (``files`` from ``checksum_files``, or computed)."""
    folder = Path(folder)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "checksum": CHECKSUM,
        "files": checksum_files(folder) if files is None else files,
    }
    write_synced(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_checkpoint(folder: Path) -> bool:
    """True when every file matches the manifest, False for a checkpoint from before
    manifests (meta.json names none); DamagedCheckpointError names the first bad file."""
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


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata (its dataclasses, torch.Size, dtypes) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        is_dtype = isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch" and (is_dtype or name in ("memory_format", "layout")):
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
            metadata = MetadataUnpickler(io.BytesIO(f.read())).load()
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


def read_dcp_metadata(path: Path):  # noqa: ANN202 - DCP's Metadata
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
