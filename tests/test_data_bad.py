"""Bad data, per the policy in docs/data.md: an undecodable JPEG is skipped and counted
by the wds loader and a clear error (shard + key) from DALI; a missing label, a missing
or truncated shard and a stale index are errors naming the shard (and key) before any
pipeline starts. Nothing hangs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nvidia.dali  # noqa: F401 - pinned in constraints.txt: fail here, never skip
import pytest
import torch

from dist_ast.data import shardset, writer
from tests.data_utils import corrupt_jpeg, eval_loader, take, train_loader

KINDS = ["wds", "dali"]
pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job


@pytest.fixture
def shards(digits_shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits_shards, tmp_path / "d"))


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_jpeg(kind, shards: Path) -> None:
    key = corrupt_jpeg(shards, "train-000000", 3)
    key_val = corrupt_jpeg(shards, "val-000000", 10)
    if kind == "wds":  # skip and count: the batch keeps its size
        # no shuffle blocks: stream position 3 lands in the first batch
        tr = train_loader(kind, shards, batch_size=50, shuffle_batches=1)
        x, y = next(iter(tr))
        assert len(y) == 50 and torch.isfinite(x).all()
        assert tr.stats()["bad_samples"] == 1
        ev = eval_loader(kind, shards, num_workers=0)
        assert sum(len(y) for _, y in ev) == 297 and ev.stats()["bad_samples"] == 1
    else:  # DALI cannot skip: a clear error naming shard and key, no hang
        tr = train_loader(kind, shards, batch_size=50)
        with pytest.raises(shardset.ShardError, match=rf"train-000000\.tar key {key}"):
            take(iter(tr), len(tr))
        with pytest.raises(shardset.ShardError, match=rf"val-000000\.tar key {key_val}"):
            list(eval_loader(kind, shards))


def rewrite_shard_without_label(root: Path, shard: str, pos: int) -> str:
    """Rewrite a shard (tar, index, manifest entry) with one sample's .cls left out."""
    import tarfile

    with tarfile.open(root / f"{shard}.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        k, ext = name.split(".", 1)
        samples.setdefault(k, {})[ext] = data
    victim = sorted(samples)[pos]
    del samples[victim]["cls"]
    rows = writer.write_tar(root / f"{shard}.tar", sorted(samples.items()))
    (root / f"{shard}.idx").write_text(shardset.format_index(rows))
    man = json.loads((root / shardset.MANIFEST).read_text())
    for e in man["splits"]["train"]["shards"]:
        if e["tar"] == f"{shard}.tar":
            e["bytes"] = (root / e["tar"]).stat().st_size
            e["sha256"] = shardset.sha256_file(root / e["tar"])
    (root / shardset.MANIFEST).write_text(json.dumps(man))
    return victim


@pytest.mark.parametrize("kind", KINDS)
def test_missing_label_is_an_error_naming_the_key(kind, shards: Path) -> None:
    key = rewrite_shard_without_label(shards, "train-000001", 7)
    with pytest.raises(shardset.ShardError, match=rf"train-000001\.tar key {key}: no label"):
        train_loader(kind, shards)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_shard(kind, shards: Path) -> None:
    (shards / "train-000002.tar").unlink()
    with pytest.raises(shardset.ShardError, match=r"train-000002\.tar is missing"):
        train_loader(kind, shards)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_shard(kind, shards: Path) -> None:
    with open(shards / "train-000001.tar", "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(shardset.ShardError, match=r"train-000001\.tar is 100000 bytes.*truncated"):
        train_loader(kind, shards)


def test_truncated_shard_behind_the_manifests_back_is_caught_while_reading(shards: Path) -> None:
    # the manifest updated to the cut size (as if the shard had been copied half-way)
    with open(shards / "train-000001.tar", "r+b") as f:
        f.truncate(300_000)
    man = json.loads((shards / shardset.MANIFEST).read_text())
    man["splits"]["train"]["shards"][1]["bytes"] = 300_000
    (shards / shardset.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(shardset.ShardError, match=r"train-000001\.tar.*stale index"):
        train_loader("wds", shards)


@pytest.mark.parametrize("kind", KINDS)
def test_stale_index(kind, shards: Path) -> None:
    # the index of another shard with the same count: offsets point at other members
    shutil.copy(shards / "train-000001.idx", shards / "train-000000.idx")
    with pytest.raises(shardset.ShardError, match=r"train-000000\.idx.*stale index.*--reindex"):
        train_loader(kind, shards)
    writer.reindex(shards)
    tr = train_loader(kind, shards)
    assert next(iter(tr))[0].shape[0] == 16


def test_stale_index_in_the_middle_is_caught_by_the_reader(shards: Path) -> None:
    # first and last entries still right, one in the middle shifted: found while reading
    idx = shards / "train-000000.idx"
    lines = idx.read_text().splitlines()
    lines[101], lines[102] = lines[102], lines[101]
    idx.write_text("\n".join(lines) + "\n")
    tr = train_loader("wds", shards, batch_size=100, num_workers=0)
    with pytest.raises(shardset.ShardError, match=r"train-000000\.tar: expected key .*stale index"):
        take(iter(tr), len(tr))
    with pytest.raises(shardset.ShardError, match="stale index"):
        writer.verify(shards, decode=False)


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(shardset.ShardError, match="manifest.json not found"):
        shardset.ShardSet(tmp_path, "train")


def test_bad_label_value(shards: Path) -> None:
    rows = shardset.read_index(shards / "val-000000.idx")
    off, size, name = rows[0]["cls"]
    with open(shards / "val-000000.tar", "r+b") as f:
        f.seek(off)
        f.write(b"x" * size)
    ev = eval_loader("wds", shards, num_workers=0)
    with pytest.raises(shardset.ShardError, match=r"val-000000\.tar key 000000000: label"):
        list(ev)
