"""Training FLOPs (DESIGN §1.11) against a hand count: 2 FLOPs per multiply-add, backward
= 2 x forward, each sparse layer scaled by its sub-net's density, dense layers not."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dist_ast.flops import TrainingFlops, layer_forward_flops
from dist_ast.sparsity import convert_to_subnets
from dist_ast.sparsity.masks import density_count, random_mask


class Small(nn.Module):
    """8x8 input: conv 3->8 (3x3, pad 1), grouped conv 8->8 (3x3, groups 4, pad 1),
    conv 8->16 (3x3, stride 2, pad 1), linear 256->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv3(self.conv2(x)))
        return self.fc(x.flatten(1))


# Multiply-adds per sample, by hand: outputs x (input channels per group x kh x kw).
HAND_MACS = {
    "conv1": (8 * 8 * 8) * (3 * 3 * 3),  # 512 outputs x 27 = 13,824
    "conv2": (8 * 8 * 8) * (2 * 3 * 3),  # groups=4: 2 input channels each -> 9,216
    "conv3": (16 * 4 * 4) * (8 * 3 * 3),  # stride 2: 4x4 outputs -> 18,432
    "fc": 256 * 10,  # 2,560
}


def test_layer_forward_flops_match_hand_count():
    flops = layer_forward_flops(Small(), torch.zeros(4, 3, 8, 8))
    assert flops == {name: 2 * macs for name, macs in HAND_MACS.items()}


def test_training_flops_scale_by_density_per_subnet_and_step():
    model = convert_to_subnets(Small(), 2, dense=["conv1"])
    densities = {0: {"conv2": 0.5, "conv3": 0.25, "fc": 0.1}, 1: {"conv2": 0.25, "conv3": 0.125}}
    g = torch.Generator().manual_seed(0)
    for k, per_layer in densities.items():
        masks = []
        for name, w in zip(model.sparse_names, model.sparse_weights(), strict=True):
            d = per_layer.get(name, 0.05)
            masks.append(random_mask(w.shape, density_count(d, w.numel()), g))
        model.set_masks(k, masks)
    fc_density = {0: 0.1, 1: 0.05}
    batch = 32
    tf = TrainingFlops.measure(model, torch.zeros(2, 3, 8, 8), batch_size=batch)
    assert tf.dense_flops == 2 * HAND_MACS["conv1"]
    assert tf.sparse_flops == {n: 2 * HAND_MACS[n] for n in ("conv2", "conv3", "fc")}

    def hand_step(k: int) -> float:
        d = densities[k]
        fwd = 2 * (
            HAND_MACS["conv1"]
            + HAND_MACS["conv2"] * d["conv2"]
            + HAND_MACS["conv3"] * d["conv3"]
            + HAND_MACS["fc"] * fc_density[k]
        )
        return 3 * fwd * batch  # forward + backward (2 x forward)

    for k in (0, 1):
        assert tf.step_cost(k) == pytest.approx(hand_step(k), abs=1)
    # Alternating steps 0, 1, 0: one sub-net per step; individual = both every step.
    for k in (0, 1, 0):
        tf.add_step([k])
    assert tf.total == pytest.approx(2 * hand_step(0) + hand_step(1), abs=3)
    assert tf.individual == pytest.approx(3 * (hand_step(0) + hand_step(1)), abs=6)
    # Joint step: both sub-nets.
    before = tf.total
    tf.add_step([0, 1])
    assert tf.total - before == pytest.approx(hand_step(0) + hand_step(1), abs=2)

    # A mask change is picked up by refresh().
    model.set_masks(1, [torch.ones_like(w, dtype=torch.bool) for w in model.sparse_weights()])
    tf.refresh(model)
    dense = 3 * batch * 2 * sum(HAND_MACS.values())
    assert tf.step_cost(1) == dense


def test_resnet18_forward_flops_match_the_published_count():
    # torchvision lists ResNet-18 at 1.81 GFLOPS (multiply-adds of conv + fc, 224x224).
    flops = layer_forward_flops(torchvision.models.resnet18(), torch.zeros(1, 3, 224, 224))
    assert sum(flops.values()) / 2 == pytest.approx(1.814e9, rel=0.005)
