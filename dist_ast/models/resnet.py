"""torchvision ResNet-18/50, optionally with a CIFAR-sized stem (3x3 conv, no max-pool)."""

from __future__ import annotations

import torchvision
from torch import nn


def torchvision_resnet(
    name: str, num_classes: int, zero_init_residual: bool = False, small_input: bool = False
) -> nn.Module:
    builder = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[
        name
    ]
    model = builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model
