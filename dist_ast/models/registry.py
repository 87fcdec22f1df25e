"""Which network a config builds, and its conversion to N sub-nets.

``model.name`` is a key of :data:`BUILTIN_MODELS` or any torchvision classification
model; ``model._target_`` is an importable factory ``package.module.name`` called with
``num_classes=``. Adding a built-in model is one entry in :data:`BUILTIN_MODELS`: it
becomes a valid ``model.name`` and a ``model=<name>`` config group option (dist_ast.cli).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from dist_ast.errors import ConfigError
from dist_ast.models.cifar_resnet import cifar_resnet
from dist_ast.models.resnet import torchvision_model, torchvision_names
from dist_ast.models.tiny import TinyCNN
from dist_ast.models.wrn import wide_resnet32
from dist_ast.sparsity.model import SubnetModel, convert_to_subnets, shared_batchnorm_names

if TYPE_CHECKING:
    from dist_ast.config import ModelConfig

ModelFactory = Callable[["ModelConfig"], nn.Module]

BUILTIN_MODELS: dict[str, ModelFactory] = {
    "tiny_cnn": lambda cfg: TinyCNN(cfg.num_classes, width=cfg.width),
    "wrn32": lambda cfg: wide_resnet32(cfg.num_classes),  # the paper's CIFAR table
    "resnet18": torchvision_model,  # torchvision's; model.small_input: CIFAR stem
    "resnet50": torchvision_model,
    "resnet20": lambda cfg: cifar_resnet(20, cfg.num_classes),  # the authors' CIFAR ResNets
    "resnet32": lambda cfg: cifar_resnet(32, cfg.num_classes),
    "resnet56": lambda cfg: cifar_resnet(56, cfg.num_classes),
}


def _import_target(path: str) -> Callable[..., nn.Module]:
    """The callable at ``package.module.name``, checked to accept ``num_classes=``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"invalid model._target_={path!r}: give an importable factory as package.module.name"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"invalid model._target_={path!r}: cannot import it ({type(e).__name__}: {e})"
        ) from e
    if not callable(factory):
        raise ConfigError(f"invalid model._target_={path!r}: {factory!r} is not callable")
    try:
        inspect.signature(factory).bind(num_classes=2)
    except TypeError as e:
        raise ConfigError(
            f"invalid model._target_={path!r}: it is called as f(num_classes=...) ({e})"
        ) from e
    except ValueError:  # no signature to inspect (a builtin): the call will tell
        pass
    return factory


def model_factory(cfg: ModelConfig) -> ModelFactory:
    """The builder of ``cfg``'s dense model; a ConfigError names what is allowed (also
    ModelConfig's check: it imports a target's module)."""
    if cfg._target_ is not None:
        factory = _import_target(cfg._target_)
        return lambda c: factory(num_classes=c.num_classes)
    if cfg.name in BUILTIN_MODELS:
        return BUILTIN_MODELS[cfg.name]
    if cfg.name in torchvision_names():
        return torchvision_model
    hint = f"; for an importable factory set model._target_={cfg.name}" if "." in cfg.name else ""
    raise ConfigError(
        f"invalid model.name={cfg.name!r}: choose a built-in model {tuple(BUILTIN_MODELS)} or "
        f"a torchvision classification model (torchvision.models.list_models()){hint}"
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """The dense model of ``model.name`` or ``model._target_`` (no weights loaded)."""
    net = model_factory(cfg)(cfg)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"invalid model._target_={cfg._target_!r}: returned {type(net)}")
    return net


def dense_layer_names(net: nn.Module, dense_classifier: bool) -> list[str]:
    """The layers kept dense: the first Conv2d/Linear (the stem) always, the last (the
    classifier) with ``model.dense_classifier``. For the built-in models: conv1, fc."""
    layers = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        return []
    return list(dict.fromkeys([layers[0], layers[-1]] if dense_classifier else [layers[0]]))


def build_subnet_model(cfg: ModelConfig, num_subnets: int) -> SubnetModel:
    """The dense model with every Conv2d/Linear but the dense ones sparse (N masks), every
    BatchNorm2d switchable but ``model.shared_batchnorm``'s (convert_to_subnets)."""
    net = build_model(cfg)
    try:
        shared = shared_batchnorm_names(net, cfg.shared_batchnorm)
    except ValueError as e:
        raise ConfigError(
            f"invalid model.shared_batchnorm={list(cfg.shared_batchnorm)!r}: {e}"
        ) from e
    dense = dense_layer_names(net, cfg.dense_classifier)
    sparse = [
        n for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and n not in dense
    ]
    if not sparse:
        key = f"model._target_={cfg._target_!r}" if cfg._target_ else f"model.name={cfg.name!r}"
        raise ConfigError(
            f"invalid {key}: the model has no nn.Conv2d/nn.Linear layer to make sparse besides "
            f"the dense {dense or 'none'} (first layer, classifier with model.dense_classifier)"
        )
    return convert_to_subnets(net, num_subnets, dense, shared)
