"""The CIFAR ResNets of He et al. (2016, §4.2) as the AST authors train them: ResNet-20,
-32 and -56 (depth 6n+2).

A dense 3x3 stem conv with 16 channels, three stages of n basic blocks with 16, 32 and
64 channels (the first block of stages 2 and 3 halves the resolution), a 1x1-conv +
BatchNorm shortcut where the shape changes (He et al.'s option B; their published
0.27M/0.46M/0.85M parameters are option A's zero-padded identity, which has none),
global average pooling and a linear classifier. Initialisation as the authors': convs
N(0, 2/(k*k*out)) (Kaiming, fan-out), the classifier Kaiming (fan-in) with zero bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_ast.models.wrn import BasicBlock

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)  # n = 3, 5, 7, 9, 18


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # BatchNorm output: in place
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """ResNet-``depth`` for 32x32 inputs (16/32/64 channels, (depth-2)/6 blocks per stage)."""
    return CifarResNet(depth, num_classes)
