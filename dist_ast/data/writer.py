"""The shard writer behind ``python -m dist_ast.data.shards`` (see that module and
docs/data.md for what is written): source listing, JPEG preparation, tar + index
writing, the resumable ``write_shards``, the deep check ``verify``, ``reindex``, and
``ensure_digits_shards`` for the demo data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ast.data.digits import NUM_CLASSES, load_digits_uint8
from dist_ast.data.shardset import (
    FORMAT,
    MANIFEST,
    VERSION,
    ShardError,
    check_split,
    format_index,
    load_manifest,
    sha256_file,
)

# the CLI's logger name, kept from when the writer and the CLI were one module
log = logging.getLogger("dist_ast.data.shards")

PROGRESS = ".progress.jsonl"
PLAN = ".plan.json"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
KEY_DIGITS = 9


# --------------------------------------------------------------------------- sources


@dataclass
class Item:
    """One source sample: a file path, or (for in-memory sources) an index into arrays."""

    label: int
    path: str | None = None
    index: int | None = None


def _imagefolder_split(root: Path, classes: Sequence[str]) -> list[Item]:
    items: list[Item] = []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(d):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    items.append(Item(label=label, path=str(Path(dirpath) / f)))
    # os.walk's directory order is not defined: sort by path within each class
    items.sort(key=lambda it: (it.label, it.path))
    return items


def list_imagefolder(src: Path) -> tuple[list[str], dict[str, list[Item]]]:
    train = src / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{src} has no train/ folder (expected train/<class>/<image>)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train} has no class folders")
    splits = {"train": _imagefolder_split(train, classes)}
    for name in ("val", "test"):
        d = src / name
        if d.is_dir():
            extra = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise ValueError(f"{d} has class folders missing from train/: {extra[:5]}")
            splits["val"] = _imagefolder_split(d, classes)
            break
    return classes, splits


# --------------------------------------------------------------------------- encoding


def _is_plain_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def prepare_jpeg(data: bytes, *, check: bool = True) -> tuple[bytes | None, str]:
    """Return (JPEG bytes to store, "") or (None, reason) when the image is unusable.

    Baseline RGB or grayscale JPEGs are kept byte for byte (after a cheap reduced-size
    decode that catches truncated or corrupt files); anything else (PNG, CMYK JPEG, ...)
    is decoded and re-encoded as RGB JPEG quality 95, which every decoder accepts.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and _is_plain_jpeg(data) and mode in ("RGB", "L"):
                if check:
                    im.draft(mode, (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
                return data, ""
            im = im.convert("RGB")
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=95)
            return out.getvalue(), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return None, f"{type(e).__name__}: {e}"


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


# --------------------------------------------------------------------------- tar + index


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> list[list[Any]]:
    """Write a tar of samples (key, {ext: bytes}); return the index rows
    [[ext, data_offset, size, name], ...] per sample, in the wds2idx v1.2 layout."""
    rows: list[list[Any]] = []
    fmt = tarfile.USTAR_FORMAT
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=fmt) as tf:
        for key, fields in samples:
            row: list[Any] = []
            for ext, payload in fields.items():
                name = f"{key}.{ext}"
                tf.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
                # the data ends the member, padded to whole 512-byte blocks
                padded = -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                row += [ext, tf.offset - padded, len(payload), name]
            rows.append(row)
    return rows


def write_index(tar_path: Path, idx_path: Path) -> int:
    """(Re)build the index of an existing tar: ``--reindex`` repairs stale indices."""
    rows: list[list[Any]] = []
    last = None
    with tarfile.open(tar_path, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue
            key, _, ext = m.name.partition(".")
            if key != last:
                rows.append([])
                last = key
            rows[-1] += [ext, m.offset_data, m.size, m.name]
    _atomic_write_text(idx_path, format_index(rows))
    return len(rows)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- shard tasks


@dataclass
class ShardTask:
    split: str
    number: int
    start: int  # key of the first sample (position in the shuffled split)
    items: list[Item]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def _load_payload(item: Item, arrays: dict[str, np.ndarray] | None, split: str) -> bytes:
    if item.path is not None:
        with open(item.path, "rb") as f:
            return f.read()
    assert arrays is not None and item.index is not None
    return encode_jpeg(arrays[split][item.index])


def build_shard(
    task: ShardTask, out: str, arrays: dict[str, np.ndarray] | None, check: bool
) -> dict[str, Any]:
    """Write one shard (tar, then index) under temporary names, rename, return its entry."""
    outd = Path(out)
    name = shard_name(task.split, task.number)
    skipped: list[dict[str, str]] = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for j, item in enumerate(task.items):
            key = f"{task.start + j:0{KEY_DIGITS}d}"
            try:
                raw = _load_payload(item, arrays, task.split)
            except OSError as e:
                skipped.append({"split": task.split, "path": str(item.path), "reason": str(e)})
                continue
            jpg, why = prepare_jpeg(raw, check=check) if item.path is not None else (raw, "")
            if jpg is None:
                skipped.append({"split": task.split, "path": str(item.path), "reason": why})
                continue
            yield key, {"jpg": jpg, "cls": str(item.label).encode()}

    tar, idx = outd / f"{name}.tar", outd / f"{name}.idx"
    tmp = outd / f"{name}.tar.tmp"
    rows = write_tar(tmp, samples())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, tar)
    _atomic_write_text(idx, format_index(rows))
    return {
        "split": task.split,
        "tar": tar.name,
        "idx": idx.name,
        "count": len(rows),
        "first_key": f"{task.start:0{KEY_DIGITS}d}",
        "bytes": size,
        "sha256": digest,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- driver


def _plan(
    src: str, seed: int, shard_size: int, image_size: int
) -> tuple[list[str], dict[str, list[Item]], dict[str, np.ndarray] | None, str]:
    if src == "digits":
        data = load_digits_uint8(image_size)
        arrays = {s: data[s][0].numpy() for s in SPLITS}
        splits = {
            s: [Item(label=int(y), index=i) for i, y in enumerate(data[s][1].tolist())]
            for s in SPLITS
        }
        classes = [str(c) for c in range(NUM_CLASSES)]
        source = f"digits@{image_size}"
    else:
        classes, splits = list_imagefolder(Path(src))
        arrays = None
        source = str(Path(src).resolve())
    for i, s in enumerate(sorted(splits)):
        perm = np.random.default_rng([seed, i]).permutation(len(splits[s]))
        splits[s] = [splits[s][j] for j in perm]
    return classes, splits, arrays, source


def _fingerprint(source: str, seed: int, shard_size: int, splits: dict[str, list[Item]]) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, VERSION, source, seed, shard_size]).encode())
    for s in sorted(splits):
        for it in splits[s]:
            h.update(f"{s}\t{it.label}\t{it.path}\t{it.index}\n".encode())
    return h.hexdigest()


def _read_progress(outd: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    p = outd / PROGRESS
    if not p.exists():
        return done
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: that shard is redone
            continue
        tar, idx = outd / e["tar"], outd / e["idx"]
        if tar.exists() and idx.exists() and tar.stat().st_size == e["bytes"]:
            done[e["tar"]] = e
    return done


def write_shards(
    src: str,
    out: str | Path,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    workers: int = 0,
    image_size: int = 32,
    check_images: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) the shard directory ``out``; return the manifest."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    classes, splits, arrays, source = _plan(src, seed, shard_size, image_size)
    fp = _fingerprint(source, seed, shard_size, splits)
    plan_path = outd / PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old.get("fingerprint") != fp:
            raise ShardError(
                f"{outd} holds shards of another plan (source {old.get('source')!r}, seed "
                f"{old.get('seed')}, shard size {old.get('shard_size')}); choose another --out"
            )
    else:
        _atomic_write_text(
            plan_path,
            json.dumps(
                {"fingerprint": fp, "source": source, "seed": seed, "shard_size": shard_size}
            ),
        )
    manifest_path = outd / MANIFEST
    if manifest_path.exists():
        man = json.loads(manifest_path.read_text())
        if man.get("fingerprint") == fp:
            log.info("%s is complete (manifest.json present); nothing to do", outd)
            return man

    tasks = []
    for s in SPLITS:
        items = splits.get(s, [])
        for n in range(-(-len(items) // shard_size)):
            chunk = items[n * shard_size : (n + 1) * shard_size]
            tasks.append(ShardTask(s, n, n * shard_size, chunk))
    done = _read_progress(outd)
    todo = [t for t in tasks if f"{shard_name(t.split, t.number)}.tar" not in done]
    if done:
        log.info("resuming: %d of %d shards already complete", len(tasks) - len(todo), len(tasks))
    total = sum(len(t.items) for t in todo)

    from rich import progress as rp

    bar = rp.Progress(
        rp.TextColumn("[bold]shards[/] {task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TextColumn("images"),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        disable=not progress,
    )
    progress_file = open(outd / PROGRESS, "a")  # noqa: SIM115 - closed below

    def record(entry: dict[str, Any]) -> None:
        done[entry["tar"]] = entry
        progress_file.write(json.dumps(entry) + "\n")
        progress_file.flush()
        os.fsync(progress_file.fileno())
        for s in entry["skipped"]:
            log.warning("skipped %s (%s): %s", s["path"], s["split"], s["reason"])

    try:
        with bar:
            tid = bar.add_task(str(outd), total=total)
            if workers <= 1 or len(todo) <= 1:
                for t in todo:
                    record(build_shard(t, str(outd), arrays, check_images))
                    bar.advance(tid, len(t.items))
            else:
                with ProcessPoolExecutor(workers) as pool:
                    futs = {
                        pool.submit(build_shard, t, str(outd), arrays, check_images): t
                        for t in todo
                    }
                    for fut in as_completed(futs):
                        record(fut.result())
                        bar.advance(tid, len(futs[fut].items))
    finally:
        progress_file.close()

    man: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fp,
        "source": source,
        "seed": seed,
        "shard_size": shard_size,
        "num_classes": len(classes),
        "classes": classes,
        "splits": {},
        "skipped": [],
    }
    for s in SPLITS:
        if s not in splits:
            continue
        entries = [done[f"{shard_name(t.split, t.number)}.tar"] for t in tasks if t.split == s]
        for e in entries:
            man["skipped"] += e["skipped"]
        man["splits"][s] = {
            "count": sum(e["count"] for e in entries),
            "shards": [
                {k: e[k] for k in ("tar", "idx", "count", "first_key", "bytes", "sha256")}
                for e in entries
                if e["count"]  # a shard whose every image was skipped is left out
            ],
        }
    _atomic_write_text(manifest_path, json.dumps(man, indent=1) + "\n")
    counts = {s: v["count"] for s, v in man["splits"].items()}
    log.info(
        "wrote %s: %s samples, %d classes, %d skipped",
        outd,
        counts,
        len(classes),
        len(man["skipped"]),
    )
    return man


# --------------------------------------------------------------------------- checks


def verify(root: str | Path, *, decode: bool = True) -> dict[str, int]:
    """Deep check of a shard directory: indices, checksums, labels and (optionally) that
    every JPEG decodes. Raises ShardError naming the first bad shard and key."""
    from PIL import Image

    man = load_manifest(root)
    counts: dict[str, int] = {}
    for split in man["splits"]:
        all_rows = check_split(root, man, split, deep=True)
        n = 0
        for e, rows in zip(man["splits"][split]["shards"], all_rows, strict=True):
            with open(Path(root) / e["tar"], "rb") as f:
                for row in rows:
                    off, size, name = row["cls"]
                    f.seek(off)
                    txt = f.read(size)
                    if not txt.strip().isdigit() or int(txt) >= man["num_classes"]:
                        raise ShardError(f"shard {e['tar']} {name}: bad label {txt!r}")
                    if decode:
                        off, size, name = row["jpg"]
                        f.seek(off)
                        try:
                            with Image.open(io.BytesIO(f.read(size))) as im:
                                im.load()
                        except Exception as ex:  # noqa: BLE001
                            raise ShardError(f"shard {e['tar']} {name}: {ex}") from ex
                    n += 1
        counts[split] = n
    return counts


def reindex(root: str | Path) -> None:
    root = Path(root)
    for tar in sorted(root.glob("*.tar")):
        n = write_index(tar, tar.with_suffix(".idx"))
        log.info("indexed %s: %d samples", tar.name, n)


# --------------------------------------------------------------------------- demo data

DIGITS_SHARDS_ROOT = "runs/shards/digits"


def ensure_digits_shards(root: str | Path, image_size: int = 32) -> None:
    """Write the demo shards into ``root`` if they are not there (about two seconds);
    concurrent ranks take a file lock, so one writes and the others wait."""
    import fcntl

    root = Path(root)
    if (root / MANIFEST).exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / MANIFEST).exists():
                log.info("writing the digits demo shards to %s", root)
                write_shards("digits", root, shard_size=500, image_size=image_size, progress=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
