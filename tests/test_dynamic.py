"""Dynamic inference: set_subnet switches without moving or copying any tensor, gives
each sub-net's logits (those of its plain export), and takes microseconds."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ast.config import ASTConfig, RunConfig, config_as_dict
from dist_ast.dynamic import DynamicModel
from dist_ast.export import export_subnet
from dist_ast.subnets_io import save_model_state
from tests.subnets_utils import random_subnets


def storage_pointers(module: torch.nn.Module) -> dict[str, int]:
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return {n: t.untyped_storage().data_ptr() for n, t in tensors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = RunConfig(ast=ASTConfig(sparsities=[0.5, 0.8, 0.95]))
    model = random_subnets(config, seed=3)
    path = tmp_path_factory.mktemp("dyn") / "model.pt"
    save_model_state(path, config_as_dict(config), model)
    return config, model, path


def test_set_subnet_no_copy_and_each_subnets_logits(checkpoint):
    config, reference, path = checkpoint
    dyn = DynamicModel.from_checkpoint(path)
    x = torch.randn(6, 3, 32, 32)
    before = storage_pointers(dyn)
    outputs = []
    for k in [2, 0, 1, 2, 1, 0]:
        dyn.set_subnet(k)
        assert dyn.subnet == k
        assert storage_pointers(dyn) == before  # nothing reallocated, nothing copied
        with torch.no_grad():
            got = dyn(x)
        expected = export_subnet(config, reference, k)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # sub-nets differ


class CountTensorOps(TorchDispatchMode):
    """Counts every ATen operation dispatched while active (copies, allocations, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_switch_runs_no_tensor_operation(checkpoint):
    """Why set_subnet takes microseconds, without timing it: it dispatches not a single
    tensor operation (no copy, no allocation, no masking), only sets each layer's index;
    the forward applies the masks. (No wall-clock assertion: a loaded CI box is noisy.)"""
    dyn = DynamicModel.from_checkpoint(checkpoint[2])
    with CountTensorOps() as seen:
        for i in range(30):
            dyn.set_subnet(i % dyn.num_subnets)
    assert seen.ops == []
    with CountTensorOps() as seen:  # the counter does see tensor work when there is some
        dyn(torch.zeros(1, 3, 32, 32))
    assert len(seen.ops) > 10


def test_choose_subnet_from_budget(checkpoint):
    dyn = DynamicModel.from_checkpoint(checkpoint[2])
    flops = dyn.subnet_flops(torch.zeros(1, 3, 32, 32))
    assert flops[0] > flops[1] > flops[2]  # sparser sub-nets cost less
    assert dyn.dense_flops(torch.zeros(1, 3, 32, 32)) > flops[0]
    assert dyn.choose_subnet(flops[0], flops) == 0
    assert dyn.choose_subnet(flops[1] + 1, flops) == 1 and dyn.subnet == 1
    assert dyn.choose_subnet(flops[2], flops) == 2
    with pytest.raises(ValueError, match="no sub-net fits"):
        dyn.choose_subnet(flops[2] - 1, flops)
    assert len(dyn.measure_latency(torch.zeros(2, 3, 32, 32), repeats=2)) == 3
