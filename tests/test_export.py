"""Export round trip: sub-net k as a plain model gives sub-net k's logits (a ResNet file
loaded weights_only by plain torchvision; the tiny CNN as state_dict and torch.export
program), and the sparse files (CSR, packed N:M) densify back to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
import torchvision
from torch import nn

from dist_ast.checkpoint_io import CheckpointError
from dist_ast.config import ASTConfig, ModelConfig, RunConfig, config_as_dict
from dist_ast.export import densify, export_subnet, export_to_files, sparse_subnet
from dist_ast.subnets_io import load_model_state, load_subnet_model, save_model_state
from tests.subnets_utils import random_subnets

REPO = Path(__file__).resolve().parent.parent


def subnet_logits(model, k: int, x: torch.Tensor) -> torch.Tensor:
    model.set_subnet(k)
    with torch.no_grad():
        return model(x)


def test_resnet18_loads_in_plain_torchvision(tmp_path):
    config = RunConfig(model=ModelConfig(name="resnet18", small_input=False))
    model = random_subnets(config)
    ckpt = save_model_state(tmp_path / "model.pt", config_as_dict(config), model)
    out = tmp_path / "r18_subnet1.pt"
    report = export_to_files(ckpt, 1, out, sparse="none")  # CSR: tested on the tiny CNN
    x = torch.randn(4, 3, 32, 32)
    expected = subnet_logits(model, 1, x)

    # weights_only=True refuses any pickled class but tensors and containers, so the file
    # holds no dist_ast object: plain torch + torchvision load it.
    state = torch.load(out, weights_only=True)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(state)  # strict: same keys and shapes as torchvision's
    plain.eval()
    with torch.no_grad():
        got = plain(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The other sub-nets' logits differ: the export is really sub-net 1.
    assert not torch.allclose(got, subnet_logits(model, 0, x), atol=1e-3)

    assert report["bytes"] > 0 and "sparse_out" not in report


def test_tiny_cnn_state_dict_and_program_round_trip(tmp_path):
    config = RunConfig(ast=ASTConfig(sparsities=[0.8, 0.9, 0.95]))
    model = random_subnets(config, seed=1)
    x = torch.randn(5, 3, 32, 32)
    for k in range(3):
        plain = export_subnet(config, model, k)
        torch.testing.assert_close(plain(x), subnet_logits(model, k, x), rtol=1e-5, atol=1e-5)
        n_zero = sum(int((plain.get_submodule(n).weight == 0).sum()) for n in model.sparse_names)
        nonzero, total = model.mask_counts(k)
        assert n_zero >= total - nonzero

    ckpt = save_model_state(tmp_path / "model.pt", config_as_dict(config), model)
    report = export_to_files(ckpt, 2, tmp_path / "s2.pt2", fmt="pt2")
    program = torch.export.load(report["out"]).module()
    torch.testing.assert_close(program(x), subnet_logits(model, 2, x), rtol=1e-5, atol=1e-5)
    # 95% sparse: CSR (4-byte values + 4-byte column indices) is far below dense.
    assert report["sparse"] == "csr"
    assert report["sparse_bytes"] < 0.35 * report["dense_bytes"]
    dense = densify(torch.load(report["sparse_out"]))
    for key, t in export_subnet(config, model, 2).state_dict().items():
        torch.testing.assert_close(dense[key], t, rtol=0, atol=0)
    json.dumps(report)


def test_nm_packed_file_round_trips_and_is_smaller(tmp_path):
    patterns = ["2:4", "1:4", "1:8"]
    config = RunConfig(ast=ASTConfig(sparsities=[0.5, 0.75, 0.875], nm_patterns=patterns))
    model = random_subnets(config, seed=2, nm_patterns=patterns)
    for k, p in enumerate(patterns):
        packed = sparse_subnet(model, k, "nm", p)
        assert {v["layout"] for v in packed["layers"].values()} == {"nm"}
        dense = densify(packed)
        plain = export_subnet(config, model, k).state_dict()
        for key, t in plain.items():
            torch.testing.assert_close(dense[key], t, rtol=0, atol=0)
        csr = sparse_subnet(model, k, "csr")
        torch.save(packed, tmp_path / "nm.pt")
        torch.save(csr, tmp_path / "csr.pt")
        # N values + N one-byte positions per group beat CSR's 4-byte column indices.
        nm_size = (tmp_path / "nm.pt").stat().st_size
        assert nm_size < (tmp_path / "csr.pt").stat().st_size


def test_load_model_state_rejects_other_files(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a dist_ast model file"):
        load_model_state(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model_state(tmp_path / "missing")


class _RunsCode:
    """A pickle that would run ``touch`` when loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_model_state_never_unpickles_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"config": {}, "model": {}, "extra": _RunsCode(marker)}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_model_state(tmp_path / "bad.pt")
    assert not marker.exists()


def test_a_dcp_folder_of_another_program_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "foreign"
    torch.distributed.checkpoint.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    with pytest.raises(CheckpointError, match="no meta.json: not a dist_ast checkpoint") as e:
        load_model_state(folder)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_export_cli_on_a_trained_small_input_resnet18_gives_plain_torchvision_the_logits(
    tmp_path,
):
    """The README's two commands as subprocesses: train a ResNet-18 with the small-input
    stem for 3 steps (every sub-net trains once and updates its mask once), then
    ``python -m dist_ast.export ckpt=<run> subnet=1 out=…``; the file loads
    (weights_only) into plain torchvision with the documented stem swap, and its logits
    are those of sub-net 1 inside dist_ast."""
    run_dir, out = tmp_path / "r18", tmp_path / "r18_subnet1.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    train = [
        "experiment=demo",
        "model=resnet18",
        "model.small_input=true",
        "data.image_size=16",
        "train.batch_size=4",
        "train.stop_after_steps=3",
        "ast.update_every=3",
        "ast.stagger=1",
        "train.final_eval=false",
        "train.progress=false",
        "train.device=cpu",
        f"run_dir={run_dir}",
    ]
    for cmd in (
        ["-m", "dist_ast.train", *train],
        ["-m", "dist_ast.export", f"ckpt={run_dir}", "subnet=1", f"out={out}", "sparse=none"],
    ):
        r = subprocess.run(
            [sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"-> {out}" in r.stdout.replace("\n", "")
    updates = [
        json.loads(line).get("mask_update")
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [1] in updates  # sub-net 1's mask was updated by training, not only initialized

    plain = torchvision.models.resnet18(num_classes=10)
    plain.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # README: model.small_input=true
    plain.maxpool = nn.Identity()
    plain.load_state_dict(torch.load(out, weights_only=True))  # strict
    plain.eval()

    _, model = load_subnet_model(run_dir)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = plain(x)
    torch.testing.assert_close(got, subnet_logits(model, 1, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, subnet_logits(model, 0, x), atol=1e-4)  # really sub-net 1
    nonzero, total = model.mask_counts(1)
    zeros = sum(int((plain.get_submodule(n).weight == 0).sum()) for n in model.sparse_names)
    assert zeros >= total - nonzero > 0
