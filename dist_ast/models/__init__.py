"""Model zoo: each builder returns a plain torch model whose first conv is ``conv1`` and
whose classifier is ``fc``; :func:`build_subnet_model` converts it for N sub-nets."""

from __future__ import annotations

from torch import nn

from dist_ast.config import ModelConfig
from dist_ast.sparsity.model import SubnetModel, convert_to_subnets


def build_model(cfg: ModelConfig) -> nn.Module:
    """The dense model named by ``model.name``."""
    if cfg.name == "tiny_cnn":
        from dist_ast.models.tiny import TinyCNN

        return TinyCNN(cfg.num_classes, width=cfg.width)
    if cfg.name == "wrn32":
        from dist_ast.models.wrn import wide_resnet32

        return wide_resnet32(cfg.num_classes)
    if cfg.name in ("resnet18", "resnet50"):
        from dist_ast.models.resnet import torchvision_resnet

        return torchvision_resnet(
            cfg.name, cfg.num_classes, cfg.zero_init_residual, cfg.small_input
        )
    raise ValueError(f"unknown model.name={cfg.name!r}")


def dense_layer_names(cfg: ModelConfig) -> list[str]:
    """The first conv always; the classifier when ``model.dense_classifier``."""
    return ["conv1", "fc"] if cfg.dense_classifier else ["conv1"]


def build_subnet_model(cfg: ModelConfig, num_subnets: int) -> SubnetModel:
    return convert_to_subnets(build_model(cfg), num_subnets, dense_layer_names(cfg))
