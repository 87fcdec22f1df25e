"""Model factories that tests name as ``model._target_=tests.model_factories.<name>``,
the way a user names one of their own package."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head: sparse convs, switchable BatchNorms."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def small_net(num_classes: int) -> nn.Module:
    return SmallNet(num_classes)


def linear_probe(num_classes: int) -> nn.Module:
    """One linear layer: the first layer stays dense, so nothing is left to sparsify."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


def no_num_classes() -> nn.Module:
    return SmallNet(10)


NOT_CALLABLE = 3
