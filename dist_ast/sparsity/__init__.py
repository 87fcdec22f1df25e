"""The AST sparsity engine: masks, masked layers, schedules, prune-and-regrow, GC, SGD."""

from dist_ast.sparsity.gradient_correction import GradientCorrection, project_conflict
from dist_ast.sparsity.layers import SubnetConv2d, SubnetLinear, SwitchableBatchNorm2d
from dist_ast.sparsity.model import SubnetModel, convert_to_subnets
from dist_ast.sparsity.optim import MaskedSGD
from dist_ast.sparsity.prune_regrow import drop_and_regrow, global_magnitude_prune, prune_and_regrow
from dist_ast.sparsity.schedule import SparsitySchedule, cubic_sparsity, regrow_fraction

__all__ = [
    "GradientCorrection",
    "MaskedSGD",
    "SparsitySchedule",
    "SubnetConv2d",
    "SubnetLinear",
    "SubnetModel",
    "SwitchableBatchNorm2d",
    "convert_to_subnets",
    "cubic_sparsity",
    "drop_and_regrow",
    "global_magnitude_prune",
    "project_conflict",
    "prune_and_regrow",
    "regrow_fraction",
]
