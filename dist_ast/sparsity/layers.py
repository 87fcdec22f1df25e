"""Layers that hold N sub-nets: masked conv/linear and switchable BatchNorm.

Every layer reads the active sub-net from its ``subnet`` attribute, set for the whole
model by :meth:`dist_ast.sparsity.model.SubnetModel.set_subnet`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _StraightThroughMask(torch.autograd.Function):
    """Forward w ⊙ m; backward passes the dense gradient ∂L/∂(w ⊙ m) to w.

    The dense gradient is what regrowth ranks (DESIGN §1.5); the optimizer masks it.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.where(mask, weight, 0.0)  # no bool->float copy of the mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w ⊙ m with a straight-through (dense) gradient."""
    return _StraightThroughMask.apply(weight, mask)


def channels_last_masks(masks: torch.Tensor) -> torch.Tensor:
    """``[N, O, I, kh, kw]`` masks whose every ``masks[k]`` has channels_last strides."""
    return masks.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``'s elements flattened in the storage order of ``like`` (same shape).

    DDP lays a gradient bucket out in each parameter's memory order, which for a
    channels_last conv weight is not the logical (row-major) order.
    """
    order = sorted(range(like.ndim), key=lambda d: (-like.stride(d), d))
    return t.permute(order).reshape(-1)


class SubnetSparseMixin:
    """Holds ``masks``: a bool buffer [N, *weight.shape], one mask per sub-net.

    The shared weight is never zeroed: a weight pruned in sub-net k may be live in j.
    The masks are a buffer so that they move with ``.to()`` and appear in
    ``state_dict()``; the DDP wrapper excludes them from buffer broadcasts.
    """

    weight: nn.Parameter
    masks: torch.Tensor
    subnet: int

    def _init_masks(self, num_subnets: int) -> None:
        self.subnet = 0
        shape = (num_subnets, *self.weight.shape)
        self.register_buffer(
            "masks", torch.ones(shape, dtype=torch.bool, device=self.weight.device)
        )

    def active_weight(self) -> torch.Tensor:
        return masked_weight(self.weight, self.masks[self.subnet])


class SubnetConv2d(SubnetSparseMixin, nn.Conv2d):
    def __init__(self, *args, num_subnets: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_masks(num_subnets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.active_weight(), self.bias)


class SubnetLinear(SubnetSparseMixin, nn.Linear):
    def __init__(self, *args, num_subnets: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_masks(num_subnets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.active_weight(), self.bias)


class SwitchableBatchNorm2d(nn.Module):
    """BatchNorm with one set of affine parameters and running statistics per sub-net.

    Stacked as [N, C] tensors: every parameter always receives a gradient (zero rows for
    the inactive sets), so DDP needs no unused-parameter search. The optimizer leaves
    the inactive rows untouched.
    """

    def __init__(
        self,
        num_features: int,
        num_subnets: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_features, self.num_subnets = num_features, num_subnets
        self.eps, self.momentum = eps, momentum
        self.subnet = 0
        self.weight = nn.Parameter(torch.ones(num_subnets, num_features))
        self.bias = nn.Parameter(torch.zeros(num_subnets, num_features))
        self.register_buffer("running_mean", torch.zeros(num_subnets, num_features))
        self.register_buffer("running_var", torch.ones(num_subnets, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_subnets, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_subnets: int) -> SwitchableBatchNorm2d:
        """Every sub-net starts from the given BatchNorm's parameters and statistics."""
        new = cls(bn.num_features, num_subnets, eps=bn.eps, momentum=bn.momentum)
        with torch.no_grad():
            new.weight.copy_(bn.weight.detach().expand(num_subnets, -1))
            new.bias.copy_(bn.bias.detach().expand(num_subnets, -1))
            new.running_mean.copy_(bn.running_mean.expand(num_subnets, -1))
            new.running_var.copy_(bn.running_var.expand(num_subnets, -1))
        return new.to(bn.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.subnet
        if self.training:
            self.num_batches_tracked[k].add_(1)  # in place on the row: no copy back
        # Views of row k: F.batch_norm updates the running statistics of set k in place.
        return F.batch_norm(
            x,
            self.running_mean[k],
            self.running_var[k],
            self.weight[k],
            self.bias[k],
            self.training,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_subnets={self.num_subnets}, eps={self.eps}"
