"""The reading side of a shard directory, shared by the writer's checks and both
loaders: the format (``manifest.json``, the ``wds2idx`` v1.2 index), the checks that run
before any reader starts, the global sample numbering of a split, the epoch arithmetic
(rank slices, batches per epoch), the sequential sample reader and the loaders' common
part. Imports no other module of ``dist_ast.data``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_ast.errors import EXIT_DATA, ExpectedError

FORMAT = "dist_ast.shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ExpectedError, RuntimeError):
    """A shard directory that cannot be read as written; the message names shard and key."""

    exit_code = EXIT_DATA
    kind = "data error"


# --------------------------------------------------------------------------- index


def format_index(rows: Sequence[Sequence[Any]]) -> str:
    """The DALI ``wds2idx`` index format: ``v1.2 <n>`` then per sample
    ``<ext> <data offset> <size> <name>`` for each component."""
    lines = [f"v1.2 {len(rows)}"] + [" ".join(map(str, r)) for r in rows]
    return "\n".join(lines) + "\n"


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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- checks


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


# --------------------------------------------------------------------------- samples


def read_samples(shards: ShardSet, g0: int, g1: int) -> list[tuple[str, bytes, int, str]]:
    """Samples [g0, g1) of the split in order, as (key, jpg bytes, label, shard path),
    read sequentially from the tars with webdataset, starting at an index offset."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    out: list[tuple[str, bytes, int, str]] = []
    for s, p0, p1 in shards.runs(g0, g1):
        tar = shards.tars[s]
        with open(tar, "rb") as f:
            f.seek(int(shards.first[s][p0]))
            want = [k.decode() for k in shards.keys[s][p0:p1]]
            files = ({**m, "__url__": tar} for m in tar_file_iterator(f))
            it = group_by_keys(files)
            for key in want:
                try:
                    sample = next(it)
                except StopIteration:
                    raise ShardError(
                        f"shard {tar} ends before key {key}: truncated shard"
                    ) from None
                except Exception as e:  # tarfile.ReadError and friends
                    raise ShardError(f"shard {tar} near key {key}: unreadable tar ({e})") from e
                got = sample["__key__"]
                if got != key:
                    raise ShardError(
                        f"shard {tar}: expected key {key} (from its index), found {got}: "
                        "stale index; rebuild it: python -m dist_ast.data.shards --reindex "
                        f"{shards.root}"
                    )
                if "cls" not in sample:
                    raise ShardError(f"shard {tar} key {key}: no label (.cls)")
                if "jpg" not in sample:
                    raise ShardError(f"shard {tar} key {key}: no image (.jpg)")
                try:
                    label = int(sample["cls"])
                except ValueError:
                    raise ShardError(
                        f"shard {tar} key {key}: label {sample['cls'][:20]!r} is not an integer"
                    ) from None
                if not 0 <= label < shards.num_classes:
                    raise ShardError(
                        f"shard {tar} key {key}: label {label} outside [0, {shards.num_classes})"
                    )
                out.append((key, sample["jpg"], label, tar))
    return out


def read_cyclic(
    shards: ShardSet, lo: int, hi: int, q0: int, q1: int, chunk: int | None = None
) -> Iterator[list[tuple[str, bytes, int, str]]]:
    """Positions [q0, q1) of the endless stream that cycles over the slice [lo, hi), as
    runs of ``read_samples`` (at most ``chunk`` samples each)."""
    n, q = hi - lo, q0
    while q < q1:
        a = q % n
        take = min(q1 - q, n - a, chunk or n)
        yield read_samples(shards, lo + a, lo + a + take)
        q += take


class SliceLoader:
    """What both shard loaders share: split ``split``'s shards, this rank's contiguous
    slice [lo, hi) and its batches, ``len()``: B = N // (W*b) per epoch for an ``endless``
    training loader (equal on every rank), the whole slice for an evaluation pass."""

    endless = False

    def __init__(
        self,
        root: str,
        *,
        dataset: str,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device | str,
        image_size: int,
        num_workers: int,
        split: str = "val",
        seed: int = 0,
        rrc_min: float = 0.08,
    ) -> None:
        self.shards = ShardSet(root, split)
        self.dataset, self.image_size, self.num_workers = dataset, image_size, num_workers
        self.seed, self.rrc_min = seed, rrc_min
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.device = torch.device(device)
        self.lo, self.hi = rank_slice(len(self.shards), rank, world_size)
        if self.endless:
            self.num_batches = batches_per_epoch(len(self.shards), world_size, batch_size)
        else:
            self.num_batches = -(-(self.hi - self.lo) // batch_size)
        self.bad_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    def stats(self) -> dict[str, int]:
        return {"bad_samples": self.bad_samples}
