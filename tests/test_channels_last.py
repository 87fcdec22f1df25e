"""channels_last (NHWC) for models with sparse convs: weights and every sub-net's mask in
one layout, and training that matches the row-major run."""

from __future__ import annotations

import pytest
import torch

from dist_ast.config import ModelConfig
from dist_ast.models import build_subnet_model
from dist_ast.sparsity.layers import SubnetConv2d, memory_order
from tests.trainer_utils import DEMO40, cpu_trainer

CL = torch.channels_last


def test_weights_and_masks_share_the_nhwc_layout() -> None:
    torch.manual_seed(0)
    model = build_subnet_model(ModelConfig(name="resnet18", num_classes=10), 3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_channels_last()
    convs = [m for m in model.modules() if isinstance(m, SubnetConv2d)]
    assert convs, "resnet18 has sparse convs"
    for m in convs:
        assert m.weight.is_contiguous(memory_format=CL)
        for k in range(3):
            mask = m.masks[k]  # a view the masked forward reads: same strides, no copy
            assert mask.stride() == m.weight.stride()
            assert mask.untyped_storage().data_ptr() == m.masks.untyped_storage().data_ptr()
    for name, value in model.state_dict().items():  # values unchanged, only the layout
        assert torch.equal(value, reference[name]), name


def test_loading_a_state_dict_keeps_the_layout() -> None:
    torch.manual_seed(0)
    plain = build_subnet_model(ModelConfig(name="resnet18", num_classes=10), 2)
    nhwc = build_subnet_model(ModelConfig(name="resnet18", num_classes=10), 2).to_channels_last()
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.net.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=CL)
    assert conv.masks[1].is_contiguous(memory_format=CL)
    assert torch.equal(conv.masks, plain.net.layer1[0].conv1.masks)


def test_memory_order_follows_the_strides_of_its_reference() -> None:
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).contiguous(memory_format=CL)
    storage = torch.as_strided(w, (w.numel(),), (1,))  # the elements as they lie in memory
    assert torch.equal(memory_order(w.contiguous(), like=w), storage)
    assert torch.equal(memory_order(w, like=w.contiguous()), w.reshape(-1))


def train(tmp_path, channels_last: bool, steps: int):
    trainer = cpu_trainer(DEMO40, tmp_path, f"train.channels_last={channels_last}")
    trainer.batches = iter(trainer.loaders.train)
    return run_more(trainer, steps)


def run_more(trainer, steps: int):
    for _ in range(steps):
        x, y = next(trainer.batches)
        x = x.to(torch.get_default_dtype())
        if trainer.config.train.channels_last:
            x = x.contiguous(memory_format=CL)
        trainer.train_step(x, y)
        trainer.step += 1
    return trainer


@pytest.fixture
def float64():
    """fp64 trajectories: PyTorch's NHWC BatchNorm kernel on CPU sums in another order
    than the row-major one (1e-4 apart in fp32 on a trained state, which training
    amplifies); in fp64 the two layouts agree to ~1e-12 and the decisions must match."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.slow
def test_nhwc_training_matches_row_major_through_mask_updates(tmp_path, float64) -> None:
    """Same masks after every update, with regrowth; same weights up to rounding."""
    plain, nhwc = train(tmp_path / "a", False, 40), train(tmp_path / "b", True, 40)
    assert len(plain.mask_updates) >= 6 and plain.mask_updates == nhwc.mask_updates
    assert any(u["reset"] for u in plain.mask_updates), "regrowth grew fresh weights"
    for k in range(plain.model.num_subnets):
        for a, b in zip(plain.model.masks(k), nhwc.model.masks(k), strict=True):
            assert torch.equal(a, b)
    conv = nhwc.model.sparse_weights()[0]
    assert conv.ndim == 4 and conv.is_contiguous(memory_format=CL)
    for (name, a), b in zip(plain.model.named_parameters(), nhwc.model.parameters(), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_with_channels_last_trains(tmp_path, precision: str) -> None:
    """engine=deepspeed keeps its flat row-major parameters (it broadcasts them as bytes,
    which NHWC strides refuse) and takes NHWC inputs; through a mask update."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "dist_ast.train", "experiment=demo", "engine=deepspeed",
            "engine.zero_stage=2", f"train.precision={precision}", "train.channels_last=true",
            "model.width=8", "train.stop_after_steps=12", "train.progress=false",
            f"run_dir={run_dir}",
        ],
        cwd=root, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12
    assert all(s["top1"] is not None for s in summary["subnets"])
