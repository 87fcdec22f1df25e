"""Write and check WebDataset shards: pre-shuffled tars of ``jpg`` + ``cls`` samples.

    python -m dist_ast.data.shards --src /data/imagenet --out /data/imagenet-wds
    python -m dist_ast.data.shards --src digits --out runs/shards/digits
    python -m dist_ast.data.shards --verify /data/imagenet-wds

The source is an ImageFolder tree (``train/<class>/<image>`` and ``val/`` or ``test/``,
class index = sorted class folder names, as torchvision numbers them) or ``digits`` (the
bundled demo data). Each split is shuffled once with ``--seed`` and cut into shards of
``--shard-size`` samples: ``train-000000.tar`` ... (the source's ``test/`` becomes
``val``). Every shard gets a DALI index (``train-000000.idx``, the ``wds2idx`` v1.2
format), and ``manifest.json`` lists classes, per-shard sample counts, sizes and sha256.

A sample is ``<key>.jpg`` (the source JPEG bytes, re-encoded only when the source is not
a baseline RGB/grayscale JPEG) and ``<key>.cls`` (the class index as decimal text). Keys
are the sample's 9-digit position in the shuffled split. Source images that cannot be
decoded are skipped, logged and listed under ``skipped`` in the manifest.

Rerunning with the same arguments skips completed shards: each shard is written under a
temporary name and renamed, and recorded in ``.progress.jsonl`` only once complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ast.errors import EXIT_DATA, ExpectedError

log = logging.getLogger("dist_ast.data.shards")

FORMAT = "dist_ast.shards"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = ".progress.jsonl"
PLAN = ".plan.json"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
KEY_DIGITS = 9


class ShardError(ExpectedError, RuntimeError):
    """A shard directory that cannot be read as written; the message names shard and key."""

    exit_code = EXIT_DATA
    kind = "data error"


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


def format_index(rows: Sequence[Sequence[Any]]) -> str:
    """The DALI ``wds2idx`` index format: ``v1.2 <n>`` then per sample
    ``<ext> <data offset> <size> <name>`` for each component."""
    lines = [f"v1.2 {len(rows)}"] + [" ".join(map(str, r)) for r in rows]
    return "\n".join(lines) + "\n"


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


def read_index(idx_path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse an index: per sample {ext: (data_offset, size, member name)}."""
    with open(idx_path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != "v1.2":
            raise ShardError(f"{idx_path}: not a v1.2 webdataset index (header {head!r})")
        out = []
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if len(parts) % 4:
                raise ShardError(f"{idx_path}: malformed line {line.strip()!r}")
            out.append(
                {
                    parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                    for i in range(0, len(parts), 4)
                }
            )
    if len(out) != int(head[1]):
        raise ShardError(f"{idx_path}: header says {head[1]} samples, found {len(out)}")
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


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
        from dist_ast.data.digits import NUM_CLASSES, load_digits_uint8

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

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]shards[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
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


# --------------------------------------------------------------------------- reading side


def load_manifest(root: str | Path) -> dict[str, Any]:
    p = Path(root) / MANIFEST
    if not p.exists():
        raise ShardError(
            f"{p} not found: {root} is not a complete shard directory "
            "(write one with `python -m dist_ast.data.shards --src ... --out ...`)"
        )
    man = json.loads(p.read_text())
    if man.get("format") != FORMAT:
        raise ShardError(f"{p}: not a {FORMAT} manifest")
    return man


def iter_checked_shards(
    root: str | Path, man: dict[str, Any], split: str, *, deep: bool = False
) -> Iterator[tuple[dict[str, Any], list[dict[str, tuple[int, int, str]]]]]:
    """Check a split's shards against the manifest before any reader starts, so a broken
    directory fails fast with the shard (and key) named instead of hanging a pipeline:
    missing shard, truncated shard (size), stale or foreign index (count, member names
    read back at the first and last sample), sample without a label. ``deep`` also checks
    every member name and the sha256. Yields (manifest entry, parsed index) per shard."""
    root = Path(root)
    if split not in man["splits"]:
        raise ShardError(f"{root}: manifest has no split {split!r}")
    for e in man["splits"][split]["shards"]:
        tar, idx = root / e["tar"], root / e["idx"]
        if not tar.exists():
            raise ShardError(f"shard {tar} is missing (listed in {root / MANIFEST})")
        if not idx.exists():
            raise ShardError(
                f"index {idx} is missing; rebuild it: python -m dist_ast.data.shards "
                f"--reindex {root}"
            )
        size = tar.stat().st_size
        if size != e["bytes"]:
            raise ShardError(
                f"shard {tar} is {size} bytes, the manifest says {e['bytes']}: truncated or "
                "rewritten; rewrite the shard directory"
            )
        rows = read_index(idx)
        if len(rows) != e["count"]:
            raise ShardError(
                f"index {idx} lists {len(rows)} samples, the manifest {e['count']}: stale "
                f"index; rebuild it: python -m dist_ast.data.shards --reindex {root}"
            )
        with open(tar, "rb") as f:
            probe = range(len(rows)) if deep else sorted({0, len(rows) - 1} if rows else ())
            for i in probe:
                row = rows[i]
                for ext in ("jpg", "cls"):
                    if ext not in row:
                        key = next(iter(row.values()))[2].split(".")[0]
                        raise ShardError(
                            f"shard {tar} key {key}: no .{ext} component (missing label or image)"
                        )
                for off, n, name in row.values():
                    if off + n > size or off < 512:
                        raise ShardError(
                            f"index {idx} points past the end of {tar} at {name}: stale index"
                        )
                    f.seek(off - 512)
                    hdr_name = f.read(100).split(b"\0", 1)[0].decode(errors="replace")
                    if hdr_name != name:
                        raise ShardError(
                            f"index {idx} says {name} at offset {off} but the tar has "
                            f"{hdr_name!r} there: stale index; rebuild it: python -m "
                            f"dist_ast.data.shards --reindex {root}"
                        )
        if deep:
            starts = [min(off for off, _n, _name in row.values()) for row in rows]
            for a, b, row in zip(starts, starts[1:], rows[1:], strict=False):
                if b <= a:
                    name = next(iter(row.values()))[2]
                    raise ShardError(f"index {idx} is out of tar order at {name}: stale index")
            for row in rows:
                if "jpg" not in row or "cls" not in row:
                    key = next(iter(row.values()))[2].split(".")[0]
                    raise ShardError(f"shard {tar} key {key}: missing .jpg or .cls")
            digest = sha256_file(tar)
            if digest != e["sha256"]:
                raise ShardError(f"shard {tar}: sha256 {digest} != manifest {e['sha256']}")
        yield e, rows


def check_split(
    root: str | Path, man: dict[str, Any], split: str, *, deep: bool = False
) -> list[list[dict[str, tuple[int, int, str]]]]:
    """iter_checked_shards as a list of parsed indices."""
    return [rows for _e, rows in iter_checked_shards(root, man, split, deep=deep)]


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dist_ast.data.shards",
        description="Write pre-shuffled WebDataset shards with DALI indices and a manifest.",
    )
    p.add_argument("--src", help="ImageFolder root (train/ and val/ or test/), or 'digits'")
    p.add_argument("--out", help="output directory")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--image-size", type=int, default=32, help="digits only: image side")
    p.add_argument("--no-check", action="store_true", help="skip the quick decode check")
    p.add_argument("--verify", metavar="DIR", help="deep-check an existing shard directory")
    p.add_argument("--reindex", metavar="DIR", help="rebuild the .idx files of a directory")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING if a.quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False)],
    )
    try:
        if a.verify:
            log.info("verified %s: %s", a.verify, verify(a.verify))
        elif a.reindex:
            reindex(a.reindex)
        else:
            if not a.src or not a.out:
                p.error("--src and --out are required")
            write_shards(
                a.src,
                a.out,
                shard_size=a.shard_size,
                seed=a.seed,
                workers=a.workers,
                image_size=a.image_size,
                check_images=not a.no_check,
                progress=not a.quiet,
            )
    except (ShardError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- epochs


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of n samples: DALI's sharding rule
    (``fn.readers.webdataset(shard_id=rank, num_shards=world_size)``)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def batches_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Training batches per rank per epoch: floor(n / (world_size * batch_size)), the same
    on every rank; raises if the data cannot fill one batch per rank."""
    b = n // (world_size * batch_size)
    if b == 0:
        raise ValueError(
            f"{n} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks: lower train.batch_size"
        )
    return b


class ShardSet:
    """The reading side of one split: manifest, parsed indices, global sample numbering
    (shards in manifest order, samples in tar order)."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = load_manifest(root)
        # compact per-shard arrays (ImageNet: 1.28 M samples): the tar offset of each
        # sample's first header, and its key
        self.first: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        for e, rows in iter_checked_shards(self.root, self.manifest, split):
            for row in rows:
                if "jpg" not in row or "cls" not in row:
                    name = next(iter(row.values()))[2]
                    raise ShardError(
                        f"shard {self.root / e['tar']} key {name.split('.')[0]}: no "
                        f"{'label (.cls)' if 'jpg' in row else 'image (.jpg)'}"
                    )
            self.first.append(
                np.array([min(v[0] for v in row.values()) - 512 for row in rows], np.int64)
            )
            self.keys.append(np.array([row["jpg"][2].split(".")[0] for row in rows], np.bytes_))
        self.entries = self.manifest["splits"][split]["shards"]
        self.tars = [str(self.root / e["tar"]) for e in self.entries]
        self.idxs = [str(self.root / e["idx"]) for e in self.entries]
        self.counts = [len(k) for k in self.keys]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.starts[-1])
        self.num_classes = int(self.manifest["num_classes"])

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, g: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        return s, g - int(self.starts[s])

    def runs(self, g0: int, g1: int) -> Iterator[tuple[int, int, int]]:
        """Split global samples [g0, g1) into per-shard runs (shard, first pos, end pos)."""
        g = g0
        while g < g1:
            s, p = self.locate(g)
            end = min(self.counts[s], p + (g1 - g))
            yield s, p, end
            g += end - p


# --------------------------------------------------------------------------- loaders

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


def shard_loaders(
    cfg: Any,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: Any,
) -> tuple[Any, Any, int]:
    """(train, val, num_classes) for a DataConfig naming a shard dataset."""
    import torch

    root = cfg.root
    if cfg.name == "digits_shards":
        root = root or DIGITS_SHARDS_ROOT
        ensure_digits_shards(root)
    if not root:
        raise ShardError(f"data.root is empty: point it at a shard directory for data={cfg.name}")
    if not (Path(root) / MANIFEST).exists():
        hint = (
            " Point data.root at a folder written by `python -m dist_ast.data.shards --src "
            "<ImageFolder tree> --out <shard dir>`."
        )
        if not Path(root).is_dir():
            hint = f" The folder does not exist.{hint}"
        elif (Path(root) / "train").is_dir():
            hint = (
                f" It looks like an ImageFolder tree: convert it with `python -m "
                f"dist_ast.data.shards --src {root} --out <shard dir>` and set data.root to "
                "the shard dir."
            )
        raise ShardError(f"data.root={root!r} has no {MANIFEST}.{hint}")
    device = torch.device(device)
    common = dict(
        dataset=cfg.name,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        image_size=cfg.image_size,
        num_workers=cfg.num_workers,
    )
    if cfg.loader == "wds":
        from dist_ast.data.wds import WdsEvalLoader, WdsTrainLoader

        train = WdsTrainLoader(root, seed=seed, rrc_min=cfg.random_resized_crop_min, **common)
        val = WdsEvalLoader(root, **common)
    elif cfg.loader == "dali":
        from dist_ast.data.dali import DaliEvalLoader, DaliTrainLoader, dali_available

        if not dali_available():
            raise ImportError(
                "data.loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130, or the "
                "[dali] extra); data.loader=wds reads the same shards without it"
            )
        train = DaliTrainLoader(root, seed=seed, rrc_min=cfg.random_resized_crop_min, **common)
        val = DaliEvalLoader(root, **common)
    else:
        raise ValueError(
            f"data.loader={cfg.loader!r} does not apply to data={cfg.name} (shards): "
            "choose wds or dali"
        )
    return train, val, train.shards.num_classes
