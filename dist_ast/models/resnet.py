"""torchvision classification models by name, and the CIFAR stem for its ResNets."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torchvision
from torch import nn

from dist_ast.errors import ConfigError

if TYPE_CHECKING:
    from dist_ast.config import ModelConfig


@cache
def torchvision_names() -> frozenset[str]:
    """torchvision's classification models (no detection, segmentation or video)."""
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(cfg: ModelConfig) -> nn.Module:
    """``torchvision.models.get_model(model.name)`` with no weights and model.num_classes.

    ``model.zero_init_residual`` goes to the ResNets (others refuse it);
    ``model.small_input`` swaps a ResNet's 7x7/2 stem and max-pool for a 3x3/1 conv, the
    usual CIFAR variant (32x32 inputs would otherwise shrink to 1x1 before the last stage).
    """
    kwargs: dict = {"num_classes": cfg.num_classes}
    if cfg.zero_init_residual:
        kwargs["zero_init_residual"] = True
    net = torchvision.models.get_model(cfg.name, weights=None, **kwargs)
    is_resnet = isinstance(net, torchvision.models.ResNet)
    if cfg.zero_init_residual and not is_resnet:  # others take **kwargs and ignore it
        raise ConfigError(
            f"invalid model.zero_init_residual=True for model.name={cfg.name!r}: only "
            "torchvision ResNets take it; set model.zero_init_residual=false"
        )
    if cfg.small_input:
        conv1 = getattr(net, "conv1", None)
        if not is_resnet or not isinstance(conv1, nn.Conv2d):
            raise ConfigError(
                f"invalid model.small_input=True for model.name={cfg.name!r}: only ResNets "
                "(a conv1 stem and a maxpool) have the CIFAR stem; set model.small_input=false"
            )
        net.conv1 = nn.Conv2d(3, conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net
