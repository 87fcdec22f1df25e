"""The shard loaders (wds and DALI on CPU): same samples and labels, equal disjoint
shares per rank, exact mid-epoch resume, and build_loaders for every data config."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nvidia.dali  # noqa: F401 - pinned in constraints.txt: fail here, never skip
import pytest
import torch

from dist_ast.config import DataConfig
from dist_ast.data import build_loaders
from dist_ast.data.dali import parse_labels
from dist_ast.data.shardset import ShardError, ShardSet, rank_slice, read_samples
from tests.data_utils import eval_loader, take, train_loader

KINDS = ["wds", "dali"]


@pytest.fixture(scope="module")
def digits(digits_shards: Path) -> Path:
    return digits_shards


@pytest.fixture(scope="module")
def cifar(cifar_shards: Path) -> Path:
    return cifar_shards


@pytest.fixture(scope="module")
def photos(photo_shards: Path) -> Path:
    return photo_shards


def test_parse_labels() -> None:
    raw = torch.zeros(4, 8, dtype=torch.uint8)
    for i, s in enumerate([b"0", b"7", b"42", b"999"]):
        raw[i, : len(s)] = torch.tensor(list(s), dtype=torch.uint8)
    assert parse_labels(raw).tolist() == [0, 7, 42, 999]


@pytest.mark.parametrize("which", ["digits", "cifar", "photos"])
@pytest.mark.parametrize("world", [1, 2])
def test_both_loaders_read_the_same_val_samples(which, world, request) -> None:
    root = request.getfixturevalue(which)
    kinds = KINDS
    ss = ShardSet(root, "val")
    seen = {}
    for kind in kinds:
        per_rank = []
        for r in range(world):
            # no worker processes: the wds order is sequential, as DALI's
            ev = eval_loader(kind, root, rank=r, world_size=world)
            xs, ys = zip(*list(ev), strict=True)
            assert len(xs) == len(ev)
            x, y = torch.cat(xs), torch.cat(ys)
            lo, hi = rank_slice(len(ss), r, world)
            assert len(y) == hi - lo  # no padding, no loss
            assert x.dtype == torch.float32 and x.shape[1] == 3
            if r == world - 1:  # a second pass reads the same share again
                assert torch.cat([y2 for _, y2 in ev]).tolist() == y.tolist()
            per_rank.append((x, y))
        seen[kind] = per_rank
    # labels: exactly the shards' labels, in order, for every rank
    for r in range(world):
        lo, hi = rank_slice(len(ss), r, world)
        want = [s[2] for s in read_samples(ss, lo, hi)]
        for kind in kinds:
            assert seen[kind][r][1].tolist() == want, kind
    if len(kinds) == 2:
        for r in range(world):
            xw, xd = seen["wds"][r][0], seen["dali"][r][0]
            assert xw.shape == xd.shape
            # different JPEG decoders and resize filters: close, not bit-equal
            tol = 0.06 if which != "photos" else 0.35
            assert (xw - xd).abs().mean() < tol


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_get_equal_disjoint_batches(kind, digits: Path) -> None:
    # 1500 samples in shards of 400: 4 shards over 3 ranks, batch 16 -> 31 batches each
    world, b = 3, 16
    counts = []
    for r in range(world):
        tr = train_loader(kind, digits, rank=r, world_size=world, batch_size=b)
        assert len(tr) == 1500 // (world * b) == 31
        batches = take(iter(tr), len(tr))
        assert all(x.shape == (b, 3, 32, 32) and y.shape == (b,) for x, y in batches)
        counts.append(Counter(torch.cat([y for _, y in batches]).tolist()))
    if kind == "wds":  # the exact sample sets: slices of the stream, disjoint
        keys = []
        for r in range(world):
            tr = train_loader(kind, digits, rank=r, world_size=world, batch_size=b)
            stream = tr.read_stream(0, 0, len(tr) * b)
            keys.append({s[0] for s in stream})
            assert len(keys[-1]) == len(tr) * b
            assert counts[r] == Counter(s[2] for s in stream)  # what it yielded
        assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])


def test_dali_epoch_is_the_rank_slice_when_it_divides(digits: Path) -> None:
    # 1500 = 2 ranks x 30 batches x 25: each rank's epoch is exactly its slice
    ss = ShardSet(digits, "train")
    for r in range(2):
        tr = train_loader("dali", digits, rank=r, world_size=2, batch_size=25)
        got = Counter(torch.cat([y for _, y in take(iter(tr), len(tr))]).tolist())
        lo, hi = rank_slice(1500, r, 2)
        assert got == Counter(s[2] for s in read_samples(ss, lo, hi))


@pytest.mark.parametrize(
    "kind,which,workers",
    [
        ("wds", "cifar", 2),  # resumes inside a shuffle block, with worker rotation
        ("wds", "photos", 0),
        ("dali", "cifar", 2),
        ("dali", "photos", 2),
    ],
)
def test_mid_epoch_resume_is_exact(kind, which, workers, request) -> None:
    root = request.getfixturevalue(which)
    b = 16 if which == "cifar" else 8  # 18 batches per epoch either way
    ref = train_loader(kind, root, batch_size=b, num_workers=workers)
    n = len(ref)
    total = n + 3  # run into the next epoch
    want = take(iter(ref), total)
    # inside the first shuffle block, the last batch of an epoch, into the next epoch
    for k in (5, n - 1, n + 1) if workers == 0 else (5, n + 1):
        if k >= total:
            continue
        a = train_loader(kind, root, batch_size=b, num_workers=workers)
        it = iter(a)
        take(it, k)
        state = a.state_dict()
        assert state["epoch"] == k // n and state["batches_consumed"] == k % n
        b2 = train_loader(kind, root, batch_size=b, num_workers=workers)
        b2.load_state_dict(state)
        got = take(iter(b2), total - k)
        for i, ((x, y), (wx, wy)) in enumerate(zip(got, want[k:], strict=True)):
            assert torch.equal(y, wy), (k, i)
            assert torch.equal(x, wx), (k, i)
    # a fresh loader is deterministic, and epochs differ
    again = take(iter(train_loader(kind, root, batch_size=b, num_workers=workers)), 2)
    assert torch.equal(again[0][0], want[0][0])
    assert not torch.equal(want[0][0], want[n][0])


def test_wds_resume_with_another_worker_count_warns(digits: Path, caplog) -> None:
    a = train_loader("wds", digits, num_workers=2)
    it = iter(a)
    take(it, 3)
    state = a.state_dict()
    b = train_loader("wds", digits, num_workers=1)
    b.load_state_dict(state)
    with caplog.at_level("WARNING"):
        take(iter(b), 1)
    assert "workers" in caplog.text


@pytest.mark.parametrize("loader", KINDS)
def test_build_loaders_digits_shards_writes_the_shards(loader, tmp_path: Path, digits) -> None:
    root = tmp_path / "shards"
    cfg = DataConfig(name="digits_shards", loader=loader, root=str(root), num_workers=1)
    L = build_loaders(cfg, batch_size=32, rank=1, world_size=2, seed=0)
    assert (root / "manifest.json").exists()
    assert L.num_classes == 10 and len(L.train) == 23 and L.train_size == 23 * 64
    x, y = next(iter(L.train))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    assert sum(len(y) for _, y in L.val) == 297 - 297 // 2
    sd = L.train.state_dict()
    assert all(type(v) is int for v in sd.values())


def test_build_loaders_errors(tmp_path: Path, cifar) -> None:
    with pytest.raises(ShardError, match="data.root is empty"):
        build_loaders(DataConfig(name="imagenet", loader="wds"), batch_size=8)
    tree = tmp_path / "tree"
    (tree / "train").mkdir(parents=True)
    with pytest.raises(Exception, match="python -m dist_ast.data.shards --src"):
        build_loaders(DataConfig(name="cifar10", loader="wds", root=str(tree)), batch_size=8)
    with pytest.raises(ValueError, match="choose wds or dali"):
        build_loaders(DataConfig(name="cifar10", loader="memory", root=str(cifar)), batch_size=8)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        build_loaders(DataConfig(name="cifar10", loader="wds", root=str(cifar)), batch_size=400)


def test_synthetic() -> None:
    cfg = DataConfig(name="synthetic", image_size=64, synthetic_size=96)
    L = build_loaders(cfg, batch_size=8, rank=0, world_size=2, seed=0)
    assert L.num_classes == 1000 and len(L.train) == 6 and L.train_size == 96
    it = iter(L.train)
    first = take(it, 8)
    assert first[0][0].shape == (8, 3, 64, 64) and int(first[0][1].max()) < 1000
    assert L.train.state_dict() == {"epoch": 1, "batches_consumed": 2}
    assert len(list(L.val)) == len(L.val)


def test_imagenet_recipe_shapes(photos: Path) -> None:
    for kind in KINDS:
        tr = train_loader(kind, photos, batch_size=8, image_size=48)
        x, y = next(iter(tr))
        assert x.shape == (8, 3, 48, 48) and set(y.tolist()) <= {0, 1}
        assert abs(float(x.mean())) < 1.5 and 0.3 < float(x.std()) < 2.0
        ev = eval_loader(kind, photos, batch_size=8, image_size=48)
        x, y = next(iter(ev))
        assert x.shape == (8, 3, 48, 48)


def test_bench_data_smoke(tmp_path: Path) -> None:
    from benchmarks import data, harness

    options = ["--images", "32", "--batch-size", "8", "--image-size", "64", "--workers", "0"]
    rows = data.run(harness.parse_args(data, [*options, "--rounds", "1", "--cache", str(tmp_path)]))
    names = [r["loader"] for r in rows]
    assert names[:2] == ["torchvision ImageFolder", "webdataset + torchvision"]
    assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0


def test_dali_resume_from_plain_ints(digits: Path) -> None:
    """The state is plain ints (what dist_ast.checkpoint stores); a new loader resumes."""
    from dist_ast.data.dali import bytes_to_ints, ints_to_bytes

    assert ints_to_bytes(bytes_to_ints(b"abcdefghij")) == b"abcdefghij"
    a = train_loader("dali", digits)
    it = iter(a)
    take(it, 4)
    saved = a.state_dict()
    assert all(type(v) is int for v in saved.values()) and saved["dali_len"] > 0
    want = take(it, 2)
    b = train_loader("dali", digits)
    b.load_state_dict({k: int(v) for k, v in saved.items()})
    got = take(iter(b), 2)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
