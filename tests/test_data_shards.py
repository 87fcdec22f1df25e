"""Shard writer: DALI-compatible indices, manifest, resumable writing, ImageFolder input
(CIFAR-10 subset, scikit-learn sample photos), and the epoch arithmetic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ast.data import shards as shards_cli
from dist_ast.data import shardset, writer


@pytest.fixture(scope="module")
def digits_dir(digits_shards: Path) -> Path:
    return digits_shards


def test_manifest_counts_and_checksums(digits_dir: Path) -> None:
    man = shardset.load_manifest(digits_dir)
    assert man["classes"] == [str(i) for i in range(10)]
    assert man["splits"]["train"]["count"] == 1500 and man["splits"]["val"]["count"] == 297
    assert [e["count"] for e in man["splits"]["train"]["shards"]] == [400, 400, 400, 300]
    for split in ("train", "val"):
        for e in man["splits"][split]["shards"]:
            assert shardset.sha256_file(digits_dir / e["tar"]) == e["sha256"]
            assert (digits_dir / e["tar"]).stat().st_size == e["bytes"]
    assert writer.verify(digits_dir) == {"train": 1500, "val": 297}


def test_index_is_what_wds2idx_writes(digits_dir: Path, tmp_path: Path) -> None:
    from wds2idx import IndexCreator

    for name in ("train-000001", "val-000000"):
        with IndexCreator(
            str(digits_dir / f"{name}.tar"), str(tmp_path / "x.idx"), verbose=False
        ) as ic:
            ic.create_index()
        assert (tmp_path / "x.idx").read_text() == (digits_dir / f"{name}.idx").read_text()


def test_samples_are_jpg_plus_integer_cls_and_shuffled(digits_dir: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from dist_ast.data.digits import load_digits_uint8

    src_x, src_y = load_digits_uint8()["train"]
    got: Counter = Counter()
    keys, images, labels = [], [], []
    for e in shardset.load_manifest(digits_dir)["splits"]["train"]["shards"]:
        with tarfile.open(digits_dir / e["tar"]) as tf:
            names = tf.getnames()
            assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls"}
            for n in names:
                data = tf.extractfile(n).read()
                if n.endswith(".cls"):
                    labels.append(int(data))
                    got[int(data)] += 1
                    keys.append(n.split(".")[0])
                else:
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    assert got == Counter(src_y.tolist())
    assert keys == sorted(keys) and len(set(keys)) == 1500
    assert [int(k) for k in keys[:400]] == list(range(400))  # keys: position in the shards
    # Which source image each stored one is (nearest neighbour: JPEG is lossy): the order
    # must be a shuffle of the source order across shards, each image with its own label.
    stored = torch.tensor(np.stack(images), dtype=torch.float32).flatten(1)
    source = src_x[..., 0].float().flatten(1)
    origin = torch.cdist(stored, source).argmin(dim=1)
    assert len(set(origin.tolist())) >= 1490  # a permutation (up to identical scans)
    assert all(src_y[o] == lab for o, lab in zip(origin.tolist(), labels, strict=True))
    assert int((origin == torch.arange(1500)).sum()) < 15  # not the source order
    first_shard = origin[:400].float()
    assert first_shard.min() < 50 and first_shard.max() > 1450  # drawn from the whole split
    assert abs(first_shard.mean() - 749.5) < 60  # (a uniform draw: sd of the mean ~ 20)


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    """13 small JPEGs in three classes (train) and 3 (val)."""
    from PIL import Image

    for split, n in (("train", 13), ("val", 3)):
        for i in range(n):
            d = tmp_path / "src" / split / "abc"[i % 3]
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 20), (i * 9, 50, 200 - i)).save(d / f"{i}.jpg")
    return tmp_path / "src"


def test_rerun_skips_complete_shards_and_finishes_a_cut_run(
    tiny_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "d"
    man = writer.write_shards(tiny_tree, out, shard_size=3, workers=2, progress=False)
    assert [e["count"] for e in man["splits"]["train"]["shards"]] == [3, 3, 3, 3, 1]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # simulate a crash after two shards: no manifest, the progress log cut, a stale temp file
    (out / shardset.MANIFEST).unlink()
    lines = (out / writer.PROGRESS).read_text().splitlines()
    (out / writer.PROGRESS).write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    third = json.loads(lines[2])["tar"]
    (out / third).unlink()
    (out / (third + ".tmp")).write_bytes(b"half a shard")
    man2 = writer.write_shards(tiny_tree, out, shard_size=3, progress=False)
    assert man2 == man  # byte-identical shards, same checksums
    for name in [json.loads(x)["tar"] for x in lines[:2]]:
        assert (out / name).stat().st_mtime_ns == stamp[name]  # not rewritten
    assert not (out / (third + ".tmp")).exists()
    # a complete directory: nothing to do
    assert writer.write_shards(tiny_tree, out, shard_size=3, progress=False) == man


def test_other_plan_in_same_dir_is_refused(tiny_tree: Path, tmp_path: Path) -> None:
    writer.write_shards(tiny_tree, tmp_path / "d", shard_size=5, progress=False)
    with pytest.raises(shardset.ShardError, match="another plan"):
        writer.write_shards(tiny_tree, tmp_path / "d", shard_size=5, seed=1, progress=False)


def test_cli(tiny_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "d")
    assert (
        shards_cli.main(["--src", str(tiny_tree), "--out", out, "--shard-size", "5", "--quiet"])
        == 0
    )
    assert len(list(Path(out).glob("*.tar"))) == 4
    assert shards_cli.main(["--verify", out, "--quiet"]) == 0
    (Path(out) / "train-000000.idx").unlink()
    assert shards_cli.main(["--verify", out, "--quiet"]) == 1
    assert shards_cli.main(["--reindex", out, "--quiet"]) == 0
    assert shards_cli.main(["--verify", out, "--quiet"]) == 0
    assert shards_cli.main(["--src", str(tmp_path / "nowhere"), "--out", out, "--quiet"]) == 1


def test_imagefolder_labels_follow_sorted_class_folders(cifar_tree: Path, tmp_path: Path) -> None:
    cifar_tree = Path(shutil.copytree(cifar_tree, tmp_path / "src"))
    (cifar_tree / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    man = writer.write_shards(
        cifar_tree, tmp_path / "out", shard_size=128, workers=2, progress=False
    )
    (cifar_tree / "train" / "cat" / "broken.jpg").unlink()
    tmp_path = tmp_path / "out"
    classes = sorted(os.listdir(cifar_tree / "train"))
    assert man["classes"] == classes and classes[0] == "airplane"
    assert man["splits"]["train"]["count"] == 300 and man["splits"]["val"]["count"] == 100
    assert [s["path"].rsplit("/", 1)[-1] for s in man["skipped"]] == ["broken.jpg"]
    # the source JPEG bytes are stored as they are: map them back to their folders
    src = {}
    for split, out_split in (("train", "train"), ("test", "val")):
        for label, c in enumerate(classes):
            for f in (cifar_tree / split / c).iterdir():
                src[(out_split, hashlib.sha256(f.read_bytes()).hexdigest())] = label
    seen = 0
    for split in ("train", "val"):
        for e in man["splits"][split]["shards"]:
            with tarfile.open(tmp_path / e["tar"]) as tf:
                members = {m.name: tf.extractfile(m).read() for m in tf}
            for name, data in members.items():
                if name.endswith(".jpg"):
                    label = int(members[name[:-4] + ".cls"])
                    assert src[(split, hashlib.sha256(data).hexdigest())] == label
                    seen += 1
    assert seen == 400


def test_sample_photos_through_the_writer(photo_shards: Path) -> None:
    man = shardset.load_manifest(photo_shards)
    assert man["classes"] == ["china", "flower"]
    assert man["splits"]["train"]["count"] == 48 and man["splits"]["val"]["count"] == 16


def test_png_and_grayscale_sources_are_reencoded(tmp_path: Path) -> None:
    from PIL import Image

    tree = tmp_path / "src"
    for split in ("train", "val"):
        for c, mode in (("a", "RGB"), ("b", "L")):
            d = tree / split / c
            d.mkdir(parents=True)
            Image.new(mode, (40, 30), 128).save(d / "x.png")
            Image.new("CMYK", (40, 30)).save(d / "y.jpg")
    man = writer.write_shards(tree, tmp_path / "out", shard_size=10, progress=False)
    assert man["splits"]["train"]["count"] == 4 and not man["skipped"]
    assert writer.verify(tmp_path / "out") == {"train": 4, "val": 4}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), world=st.integers(1, 16), batch=st.integers(1, 64))
def test_epoch_arithmetic(n: int, world: int, batch: int) -> None:
    slices = [shardset.rank_slice(n, r, world) for r in range(world)]
    assert slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
    if n < world * batch:
        with pytest.raises(ValueError, match="lower train.batch_size"):
            shardset.batches_per_epoch(n, world, batch)
        return
    per_rank = shardset.batches_per_epoch(n, world, batch) * batch
    # every rank's slice holds a whole epoch: no sample repeats within a rank's epoch
    assert all(hi - lo >= per_rank for lo, hi in slices)


def test_shardset_runs_cross_shards(digits_dir: Path) -> None:
    ss = shardset.ShardSet(digits_dir, "train")
    assert len(ss) == 1500 and ss.locate(399) == (0, 399) and ss.locate(400) == (1, 0)
    assert list(ss.runs(390, 1210)) == [(0, 390, 400), (1, 0, 400), (2, 0, 400), (3, 0, 10)]
