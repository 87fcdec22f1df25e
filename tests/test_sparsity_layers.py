"""DESIGN §1.1, 1.4, 1.5: masked forward, switchable BN, straight-through gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_ast.config import ModelConfig
from dist_ast.models import build_model, build_subnet_model
from dist_ast.sparsity import SubnetConv2d, SubnetLinear, SwitchableBatchNorm2d, convert_to_subnets
from dist_ast.sparsity.layers import masked_weight
from dist_ast.sparsity.masks import random_masks
from dist_ast.sparsity.updater import initial_masks


def test_masked_forward_equals_dense_model_with_masked_weights():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="tiny_cnn"))
    reference = build_model(ModelConfig(name="tiny_cnn"))
    reference.load_state_dict(net.state_dict())
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model = convert_to_subnets(net, 3, dense=["conv1"])
    for k in range(3):
        model.set_masks(
            k, random_masks(model.sparse_weights(), 0.5, torch.Generator().manual_seed(k))
        )
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    for k in range(3):
        model.set_subnet(k)
        ref_sd = dict(original)
        for name, mask in zip(model.sparse_names, model.masks(k), strict=True):
            ref_sd[f"{name}.weight"] = ref_sd[f"{name}.weight"] * mask
        reference.load_state_dict(ref_sd)
        reference.eval()
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    # the shared weight tensor is never zeroed by masking
    assert all((w != 0).all() for w in model.sparse_weights())


def test_first_conv_dense_classifier_configurable():
    m = build_subnet_model(ModelConfig(name="resnet18"), 2)
    assert type(m.net.conv1) is nn.Conv2d and isinstance(m.net.fc, SubnetLinear)
    m2 = build_subnet_model(ModelConfig(name="resnet18", dense_classifier=True), 2)
    assert type(m2.net.fc) is nn.Linear and "fc" not in m2.sparse_names
    assert all(
        isinstance(b, SwitchableBatchNorm2d)
        for b in m2.net.modules()
        if isinstance(b, nn.modules.batchnorm._BatchNorm | SwitchableBatchNorm2d)
    )
    assert isinstance(m.net.layer1[0].conv1, SubnetConv2d)


@pytest.mark.parametrize("name", ["tiny_cnn", "wrn32", "resnet18", "resnet50"])
def test_every_model_converts_and_runs_each_subnet(name):
    cfg = ModelConfig(name=name, small_input=name != "resnet50", zero_init_residual=True)
    m = build_subnet_model(cfg, 3)
    size = 64 if name == "resnet50" else 32
    x = torch.randn(2, 3, size, size)
    for k in range(3):
        m.set_subnet(k)
        assert m(x).shape == (2, 10)
    bn = [b for b in m.modules() if isinstance(b, SwitchableBatchNorm2d)]
    assert bn and all(b.weight.shape == (3, b.num_features) for b in bn)


def test_straight_through_gradient_is_dense():
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    m = torch.rand(5, 4) < 0.5
    x = torch.randn(3, 4)
    F.linear(x, masked_weight(w, m)).pow(2).sum().backward()
    # reference: the gradient w.r.t. the effective weight w ⊙ m, taken as a leaf
    eff = (w.detach() * m).requires_grad_(True)
    F.linear(x, eff).pow(2).sum().backward()
    assert torch.allclose(w.grad, eff.grad)
    assert (w.grad[~m] != 0).any()  # nonzero off the mask: what regrowth ranks


def test_switchable_bn_uses_and_updates_only_its_set():
    torch.manual_seed(0)
    bn = SwitchableBatchNorm2d(4, 3)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3, 4))
        bn.bias.copy_(torch.randn(3, 4))
    x = torch.randn(8, 4, 5, 5)
    before = {n: b.clone() for n, b in bn.named_buffers()}
    bn.subnet = 1
    bn.train()
    y = bn(x)
    ref = F.batch_norm(
        x,
        before["running_mean"][1].clone(),
        before["running_var"][1].clone(),
        bn.weight[1],
        bn.bias[1],
        True,
        0.1,
        1e-5,
    )
    assert torch.allclose(y, ref, atol=1e-6)
    for name in ("running_mean", "running_var"):
        buf = getattr(bn, name)
        assert not torch.equal(buf[1], before[name][1])
        assert torch.equal(buf[0], before[name][0]) and torch.equal(buf[2], before[name][2])
    assert bn.num_batches_tracked.tolist() == [0, 1, 0]
    y.sum().backward()
    assert bn.weight.grad[[0, 2]].abs().sum() == 0 and bn.weight.grad[1].abs().sum() > 0
    # evaluation uses set k's statistics
    bn.eval()
    bn.subnet = 2
    ev = bn(x)
    ref2 = F.batch_norm(
        x, bn.running_mean[2], bn.running_var[2], bn.weight[2], bn.bias[2], False, 0.1, 1e-5
    )
    assert torch.allclose(ev, ref2, atol=1e-6)


def test_from_batchnorm_copies_every_set():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.running_var.fill_(4.0)
    s = SwitchableBatchNorm2d.from_batchnorm(bn, 2)
    assert torch.equal(s.weight, torch.full((2, 3), 2.0))
    assert torch.equal(s.running_var, torch.full((2, 3), 4.0))


def test_initial_masks_exact_global_count():
    m = build_subnet_model(ModelConfig(name="tiny_cnn"), 2)
    masks = initial_masks(m, 0.9, seed=3)
    total = sum(w.numel() for w in m.sparse_weights())
    assert sum(int(x.sum()) for x in masks) == round(0.1 * total)


def test_set_subnet_switches_without_copying_weights():
    m = build_subnet_model(ModelConfig(name="tiny_cnn"), 3)
    ptrs = [p.data_ptr() for p in m.parameters()]
    m.set_subnet(2)
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    with pytest.raises(IndexError):
        m.set_subnet(3)


def test_update_masks_cover_sparse_weights_and_bn_rows():
    m = build_subnet_model(ModelConfig(name="tiny_cnn"), 3)
    um = m.update_masks([1])
    bn = next(b for b in m.modules() if isinstance(b, SwitchableBatchNorm2d))
    assert um[bn.weight].flatten().tolist() == [False, True, False]
    w = m.sparse_weights()[0]
    assert um[w] is m.masks(1)[0] or torch.equal(um[w], m.masks(1)[0])
    assert m.net.conv1.weight not in um  # dense layer: moves on every step
