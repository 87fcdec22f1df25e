"""Shared helpers for the data tests: shard directories cached for the whole session
(digits, a CIFAR-10 subset, scikit-learn's sample photos cut into larger JPEGs)."""

from __future__ import annotations

import fcntl
import fnmatch
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dist_ast.data import shards as S

_ROOT = Path(__file__).resolve().parents[1]
CIFAR_TGZ = (_ROOT / "../shared/data/cifar10/cifar10-jpeg.tar.gz").resolve()


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
        lambda d: S.write_shards("digits", d, shard_size=shard_size, progress=False),
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


def cifar_tree(tmp_path_factory) -> Path:
    """30 train + 10 test images per class from the shared CIFAR-10 JPEGs (ImageFolder)."""
    if not CIFAR_TGZ.exists():
        pytest.skip(f"CIFAR-10 JPEGs not found at {CIFAR_TGZ} (see ../shared/data/README.md)")
    return _cached(tmp_path_factory, "cifar-tree", extract_cifar_subset)


def cifar_shards(tmp_path_factory) -> Path:
    tree = cifar_tree(tmp_path_factory)
    return _cached(
        tmp_path_factory,
        "cifar-shards",
        lambda d: S.write_shards(tree, d, shard_size=128, progress=False),
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
        lambda d: S.write_shards(tree, d, shard_size=10, progress=False),
    )
