"""Shared helpers of the data tests: shard directories cached for the whole session
(digits, a CIFAR-10 subset, scikit-learn's sample photos cut into larger JPEGs; the
session fixtures in conftest.py hand them out), loaders as the tests build them, and
damaging a shard. Not a test module: test files import it, never each other."""

from __future__ import annotations

import fcntl
import fnmatch
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from dist_ast.data import shardset, writer

_ROOT = Path(__file__).resolve().parents[1]
# DIST_AST_CIFAR_TGZ=/nonexistent tries the digits stand-in on a machine that has ../shared
CIFAR_TGZ = Path(
    os.environ.get("DIST_AST_CIFAR_TGZ", _ROOT / "../shared/data/cifar10/cifar10-jpeg.tar.gz")
).resolve()


def _cached(tmp_path_factory, name: str, build) -> Path:
    """Build a directory once per session (pytest-xdist safe via a lock and a marker)."""
    base = tmp_path_factory.getbasetemp()
    if base.name.startswith("popen-gw"):  # xdist: share between workers
        base = base.parent
    d = base / f"data-{name}"
    with open(base / f"data-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / ".done").exists():
            d.mkdir(exist_ok=True)
            build(d)
            (d / ".done").write_text("")
    return d


def digits_shards(tmp_path_factory, shard_size: int = 400) -> Path:
    return _cached(
        tmp_path_factory,
        f"digits-{shard_size}",
        lambda d: writer.write_shards("digits", d, shard_size=shard_size, progress=False),
    )


def extract_cifar_subset(dest: Path) -> None:
    """Train images 0000-0029 and test images 0000-0009 of every class."""
    patterns = ["train/*/00[0-2]?.jpg", "test/*/000?.jpg"]
    if shutil.which("tar"):  # GNU tar: about 10x faster than tarfile on 60,000 members
        cmd = ["tar", "xzf", str(CIFAR_TGZ), "-C", str(dest), "--wildcards", *patterns]
        subprocess.run(cmd, check=True)
        return
    with tarfile.open(CIFAR_TGZ, "r:gz") as tf:
        for m in tf:
            if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in patterns):
                p = dest / m.name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(tf.extractfile(m).read())


CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def digits_as_cifar_tree(dest: Path) -> None:
    """A stand-in for the CIFAR-10 subset when ../shared is absent: the same ImageFolder
    layout (train/<class>/00NN.jpg x 30, test/<class>/000N.jpg x 10, CIFAR-10's class
    names) of 32x32 RGB JPEGs made from the bundled digits, each tinted by a per-image
    colour so the three channels differ, as in photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for split, n, start in (("train", 30, 0), ("test", 10, 30)):  # disjoint images
        for c, name in enumerate(CIFAR_CLASSES):
            out = dest / split / name
            out.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(d.target == c)[start : start + n]
            for i, j in enumerate(idx):
                g = d.images[j] / 16.0  # 8x8 in [0, 1]
                tint = rng.uniform(0.3, 1.0, size=3)
                rgb = (np.kron(g, np.ones((4, 4)))[..., None] * tint * 255).astype(np.uint8)
                Image.fromarray(rgb).save(out / f"{i:04d}.jpg", format="JPEG", quality=90)


def cifar_tree(tmp_path_factory) -> Path:
    """30 train + 10 test images per class (ImageFolder): from the shared CIFAR-10 JPEGs
    when ../shared/data has them, otherwise made from the digits (never a skip)."""
    if CIFAR_TGZ.exists():
        return _cached(tmp_path_factory, "cifar-tree", extract_cifar_subset)
    return _cached(tmp_path_factory, "cifar-tree-from-digits", digits_as_cifar_tree)


def cifar_shards(tmp_path_factory) -> Path:
    tree = cifar_tree(tmp_path_factory)
    return _cached(
        tmp_path_factory,
        "cifar-shards",
        lambda d: writer.write_shards(tree, d, shard_size=128, progress=False),
    )


def sample_photo_tree(dest: Path, crops_per_class: int = 24, size: int = 160) -> None:
    """scikit-learn's two bundled photos cut into many overlapping JPEG crops (ImageFolder
    layout, one class per photo), so that the ImageNet recipe sees real, larger images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    rng = np.random.default_rng(0)
    for img, fname in zip(data.images, data.filenames, strict=True):
        cls = Path(fname).stem
        h, w, _ = img.shape
        for split, n in (("train", crops_per_class), ("val", crops_per_class // 3)):
            d = dest / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                y, x = rng.integers(0, h - size), rng.integers(0, w - size)
                hh = size + int(rng.integers(0, size // 2))
                crop = img[y : min(h, y + hh), x : x + size]
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="JPEG", quality=90)
                (d / f"{i:04d}.jpg").write_bytes(buf.getvalue())


def photo_shards(tmp_path_factory) -> Path:
    tree = _cached(tmp_path_factory, "photo-tree", sample_photo_tree)
    return _cached(
        tmp_path_factory,
        "photo-shards",
        lambda d: writer.write_shards(tree, d, shard_size=10, progress=False),
    )


# -- loaders as the tests build them, and damaging shards


def dataset_of(root: Path) -> tuple[str, int]:
    if "cifar" in root.name:
        return "cifar10", 32
    if "photo" in root.name:
        return "imagenet", 64
    return "digits_shards", 32


def train_loader(kind: str, root: Path, **kw):
    from dist_ast.data.dali import DaliTrainLoader
    from dist_ast.data.wds import WdsTrainLoader

    dataset, size = dataset_of(root)
    args = dict(dataset=dataset, batch_size=16, rank=0, world_size=1, seed=0, device="cpu")
    args.update(image_size=size, num_workers=0 if kind == "wds" else 2)
    args.update(kw)
    return (WdsTrainLoader if kind == "wds" else DaliTrainLoader)(str(root), **args)


def eval_loader(kind: str, root: Path, **kw):
    from dist_ast.data.dali import DaliEvalLoader
    from dist_ast.data.wds import WdsEvalLoader

    dataset, size = dataset_of(root)
    args = dict(dataset=dataset, batch_size=16, rank=0, world_size=1, device="cpu")
    args.update(image_size=size, num_workers=0 if kind == "wds" else 2)
    args.update(kw)
    return (WdsEvalLoader if kind == "wds" else DaliEvalLoader)(str(root), **args)


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def corrupt_jpeg(root: Path, shard: str, pos: int) -> str:
    """Overwrite the JPEG at index row ``pos`` of ``shard`` in place (same size, SOI kept:
    it looks like a JPEG and does not decode); returns the sample's key."""
    rows = shardset.read_index(root / f"{shard}.idx")
    off, size, name = rows[pos]["jpg"]
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00" * (size - 2))
    return name.split(".")[0]
