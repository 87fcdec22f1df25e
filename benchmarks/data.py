"""Input-pipeline throughput: DALI (CPU; and GPU ``mixed`` when CUDA is present) vs the
webdataset loader vs torchvision ImageFolder + DataLoader, on the same JPEGs, the same
ImageNet training recipe (random-resized crop, flip, normalize) at 224 px and the same
number of worker processes / DALI threads.

    python -m benchmarks.data [--images 1024] [--workers 2] [--batch-size 64]

The JPEGs are crops of scikit-learn's two bundled photos (427x640), random sizes
between 256 and 427 px a side (ImageNet's typical size), quality 90, written once to
``--cache`` as an ImageFolder tree and as shards. Each loader runs ``--rounds`` times,
interleaved with the others (so a background load spike hits all of them); the table
shows the median round's images/s, excluding start-up (worker fork, pipeline build) and
the first batch, and the ratio to ImageFolder; and images per CPU-second (this process's
threads plus its DataLoader workers, from /proc), which other load on the machine does
not distort.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.data")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEG crops of the sklearn sample photos in ImageFolder layout (8 classes)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    tree = root / f"jpegs-{n}"
    if (tree / ".done").exists():
        return tree
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(8, n // 8))):
        for i in range(count):
            img = photos[i % len(photos)]
            h, w, _ = img.shape
            ch, cw = (int(v) for v in rng.integers(256, min(h, w) + 1, size=2))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = img[y : y + ch, x : x + cw]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            d = tree / split / f"c{i % 8}"
            d.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
            (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    (tree / ".done").write_text("")
    return tree


def make_shards(tree: Path, out: Path) -> Path:
    from dist_ast.data.shardset import MANIFEST
    from dist_ast.data.writer import write_shards

    if not (out / MANIFEST).exists():
        write_shards(tree, out, shard_size=256, workers=2, progress=False)
    return out


def imagefolder_loader(tree: Path, size: int, batch: int, workers: int, seed: int):
    """torchvision's reference pipeline: ImageFolder + DataLoader, float normalize in the
    workers (as the torchvision ImageNet recipe does)."""
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    ds = datasets.ImageFolder(str(tree / "train"), tf)
    g = torch.Generator().manual_seed(seed)

    def endless() -> Iterator[Any]:
        while True:
            yield from torch.utils.data.DataLoader(
                ds,
                batch_size=batch,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                generator=g,
                persistent_workers=False,
            )

    return endless()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its live descendants
    (DataLoader workers), from /proc; NaN where /proc is not there."""
    me = os.getpid()
    if not Path(f"/proc/{me}/stat").exists():
        return float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in [me, *_descendants(me)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def measure(make: Callable[[], Iterator[Any]], batches: int) -> dict[str, float]:
    """Wall images/s after the first batch; start-up seconds (first batch included);
    images per CPU-second of the whole run (start-up included; robust to other load on
    the machine, since time spent waiting for a CPU is not counted)."""
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    it = make()
    x, y = next(it)
    first = len(y)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, y = next(it)
        n += len(y)
    t2 = time.perf_counter()
    c2 = tree_cpu_seconds()  # before the workers exit
    del it, x, y
    return {
        "images_per_s": n / (t2 - t1),
        "startup_s": t1 - t0,
        "images_per_cpu_s": (n + first) / (c2 - c0),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark rows: {"loader", "device", "images_per_s", "ratio", ...}; with
    ``--json`` also written to that file."""
    from dist_ast.data.dali import DaliTrainLoader, dali_available
    from dist_ast.data.wds import WdsTrainLoader

    cache = Path(args.cache)
    tree = make_jpegs(cache, args.images)
    shards = make_shards(tree, cache / f"shards-{args.images}")
    S, B, W = args.image_size, args.batch_size, args.workers
    common = dict(dataset="imagenet", batch_size=B, rank=0, world_size=1, seed=0)
    common.update(image_size=S, num_workers=W)

    def wds():
        return iter(WdsTrainLoader(str(shards), device="cpu", **common))

    def dali(device: str, fuse: bool = True):
        return lambda: iter(DaliTrainLoader(str(shards), device=device, fuse_crop=fuse, **common))

    candidates: list[tuple[str, str, Callable[[], Iterator[Any]]]] = [
        ("torchvision ImageFolder", "cpu", lambda: imagefolder_loader(tree, S, B, W, 0)),
        ("webdataset + torchvision", "cpu", wds),
    ]
    if dali_available():
        candidates += [
            ("DALI (decode, then crop)", "cpu", dali("cpu", fuse=False)),
            ("DALI (fused decode+crop)", "cpu", dali("cpu")),
        ]
        if torch.cuda.is_available():
            candidates += [("DALI mixed (GPU decode)", "cuda", dali("cuda"))]
    batches = max(1, args.batches or (args.images // B) - 1)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _d, _m in candidates}
    for r in range(args.rounds):
        # interleaved, the order rotated every round, so that drift in the machine's load
        # hits every loader alike; ratios are paired by round (see benchmarks.harness)
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        for name, _dev, make in order:
            m = measure(make, batches)
            runs[name].append(m)
            log.info(
                "round %d %-26s %7.1f img/s  %6.1f img/CPU-s  (start-up %.1f s)",
                r,
                name,
                m["images_per_s"],
                m["images_per_cpu_s"],
                m["startup_s"],
            )
    base = candidates[0][0]

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def paired(name: str, key: str) -> float:
        return med([a[key] / b[key] for a, b in zip(runs[name], runs[base], strict=True)])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    global _LAST_LOAD, _LAST_SETUP
    _LAST_LOAD = load
    _LAST_SETUP = (
        f"{W} workers/threads, batch {B}, {S} px, {args.images} training JPEGs, "
        f"{batches} timed batches per run, {args.rounds} rounds"
    )
    rows = [
        {
            "loader": name,
            "device": dev,
            "images_per_s": round(med([m["images_per_s"] for m in runs[name]]), 1),
            "ratio": round(paired(name, "images_per_s"), 2),
            "images_per_cpu_s": round(med([m["images_per_cpu_s"] for m in runs[name]]), 1),
            "cpu_ratio": round(paired(name, "images_per_cpu_s"), 2),
            "startup_s": round(med([m["startup_s"] for m in runs[name]]), 2),
        }
        for name, dev, _ in candidates
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


_LAST_LOAD = float("nan")
_LAST_SETUP = ""
TITLE = "Input pipelines: DALI vs webdataset vs torchvision ImageFolder (ImageNet recipe)"
NOTES = (
    "Same JPEGs (crops of scikit-learn's sample photos, 256-427 px a side), random-resized "
    "crop 224 + flip + normalize, DataLoader workers = DALI threads. images/s: median of "
    "interleaved rounds; ratios: median of per-round ratios to ImageFolder; img/CPU-s counts "
    "this process's threads and its workers' CPU time, which other load does not distort."
)


def last_notes() -> str:
    return f"{_LAST_SETUP}; 1-minute load average at the end: {_LAST_LOAD:.1f}."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=1024, help="training JPEGs to generate")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=0, help="timed batches (0: one epoch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", default="runs/bench/data")
    p.add_argument("--json", help="also write the rows to this JSON file")


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["data", *sys.argv[1:]]))
