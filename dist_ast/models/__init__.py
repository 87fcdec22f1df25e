"""Model zoo: :data:`registry.BUILTIN_MODELS`, torchvision's classification models by
name, or an importable factory (``model._target_``); :func:`build_subnet_model` converts
the dense model for N sub-nets. See docs/models.md."""

from dist_ast.models.registry import (
    BUILTIN_MODELS,
    build_model,
    build_subnet_model,
    dense_layer_names,
)

__all__ = ["BUILTIN_MODELS", "build_model", "build_subnet_model", "dense_layer_names"]
