"""One container for N sub-nets of one model, and the function that converts a model."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

from dist_ast.sparsity.layers import (
    SubnetConv2d,
    SubnetLinear,
    SubnetSparseMixin,
    SwitchableBatchNorm2d,
    channels_last_masks,
)


class SubnetModel(nn.Module):
    """A network whose sparse layers hold N masks and whose BatchNorms hold N sets;
    ``set_subnet(k)`` switches every layer without copying a weight. What the optimizer may
    move is decided here (``update_masks``, ``param_groups``, ``set_update_rules``)."""

    def __init__(self, net: nn.Module, num_subnets: int) -> None:
        super().__init__()
        self.net = net
        self.num_subnets = num_subnets
        self.subnet = 0
        self.inactive_weights = "frozen"  # optim.inactive_weights
        self.batchnorm_weight_decay = False  # optim.batchnorm_weight_decay
        self._sparse = [(n, m) for n, m in net.named_modules() if isinstance(m, SubnetSparseMixin)]
        self._switchable = [m for m in net.modules() if isinstance(m, SwitchableBatchNorm2d)]
        if not self._sparse:
            raise ValueError("the model has no sparse layer: nothing to train sparsely")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def set_subnet(self, k: int) -> None:
        if not 0 <= k < self.num_subnets:
            raise IndexError(f"sub-net {k} does not exist (N={self.num_subnets})")
        self.subnet = k
        for _, m in self._sparse:
            m.subnet = k
        for m in self._switchable:
            m.subnet = k

    @torch.no_grad()
    def to_channels_last(self) -> SubnetModel:
        """NHWC conv weights and masks. ``Module.to(memory_format=...)`` refuses the 5-D
        masks; each ``masks[k]`` gets its weight's strides, so the masked forward reads both
        in one layout without a copy (flat orders, top-k and bit-packing, stay logical)."""
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if param.ndim == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
            masks = getattr(module, "masks", None)
            if isinstance(module, SubnetSparseMixin) and masks is not None and masks.ndim == 5:
                module.masks = channels_last_masks(masks)
        return self

    # -- sparse layers -------------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        return [n for n, _ in self._sparse]

    def sparse_weights(self) -> list[nn.Parameter]:
        return [m.weight for _, m in self._sparse]

    def masks(self, k: int) -> list[torch.Tensor]:
        """Views of sub-net k's masks, one per sparse layer."""
        return [m.masks[k] for _, m in self._sparse]

    @torch.no_grad()
    def set_masks(self, k: int, masks: list[torch.Tensor]) -> None:
        for (name, m), new in zip(self._sparse, masks, strict=True):
            if new.shape != m.weight.shape:
                raise ValueError(
                    f"{name}: mask shape {tuple(new.shape)} != {tuple(m.weight.shape)}"
                )
            m.masks[k].copy_(new)

    def mask_counts(self, k: int) -> tuple[int, int]:
        """(nonzero, total) over the weights of all sparse layers, from the masks."""
        nonzero = sum(int(m.masks[k].sum()) for _, m in self._sparse)
        return nonzero, sum(m.weight.numel() for _, m in self._sparse)

    def sparsity(self, k: int) -> float:
        nonzero, total = self.mask_counts(k)
        return 1.0 - nonzero / total

    def layer_sparsity(self, k: int) -> dict[str, float]:
        return {n: 1.0 - float(m.masks[k].float().mean()) for n, m in self._sparse}

    # -- what the optimizer may move ---------------------------------------------------
    def set_update_rules(
        self, inactive_weights: str = "frozen", batchnorm_weight_decay: bool = False
    ) -> None:
        """``optim.inactive_weights`` and ``optim.batchnorm_weight_decay`` (the authors'
        options, docs/algorithm.md), kept here so that every engine reads the same rules."""
        if inactive_weights not in ("frozen", "moving"):
            raise ValueError(f"inactive_weights must be frozen or moving, not {inactive_weights!r}")
        self.inactive_weights = inactive_weights
        self.batchnorm_weight_decay = bool(batchnorm_weight_decay)

    def update_masks(self, subnets: Iterable[int]) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: bool mask} of the entries that training ``subnets`` may change: the
        union of their masks (none under ``inactive_weights="moving"``: weight decay and
        momentum move every weight, as the authors' plain SGD) and their switchable
        BatchNorm rows in both modes (the authors' unused per-sub-net BatchNorms get no
        gradient). Parameters absent (dense layers, biases, shared BN) move everywhere."""
        ks = sorted(set(subnets))
        out: dict[torch.Tensor, torch.Tensor] = {}
        for _, m in self._sparse if self.inactive_weights == "frozen" else ():
            mask = m.masks[ks[0]]
            for k in ks[1:]:
                mask = mask | m.masks[k]
            out[m.weight] = mask
        if self._switchable:
            # built on the device (fills, no host-to-device copy: that would sync a GPU)
            row = torch.zeros(
                self.num_subnets, 1, dtype=torch.bool, device=self._switchable[0].weight.device
            )
            for k in ks:
                row[k] = True
            for bn in self._switchable:
                out[bn.weight] = row
                out[bn.bias] = row
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two groups: conv/linear weights (every sparse weight: GC and DeepSpeed want
        them in one group) with weight decay, then BatchNorm and biases, with none unless
        ``batchnorm_weight_decay`` (the authors decay every parameter)."""
        decay, no_decay = [], []
        for p in self.parameters():
            is_bn = any(p is bn.weight or p is bn.bias for bn in self._switchable)
            (no_decay if p.ndim <= 1 or is_bn else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {
                "params": no_decay,
                "weight_decay": weight_decay if self.batchnorm_weight_decay else 0.0,
            },
        ]


def shared_batchnorm_names(net: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The BatchNorm2d modules of ``net`` whose name matches one of the fnmatch
    ``patterns``; a pattern that matches none raises ValueError naming it."""
    bns = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    shared: list[str] = []
    for pattern in patterns:
        hits = [n for n in bns if fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no BatchNorm2d of the model (its BatchNorms: "
                f"{', '.join(bns[:6])}{' ...' if len(bns) > 6 else ''})"
            )
        shared += [n for n in hits if n not in shared]
    return shared


# the sparse layer that replaces each plain one, and the constructor arguments it copies
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
_SPARSE = {
    nn.Conv2d: (SubnetConv2d, (*_CONV_ARGS, "groups", "padding_mode")),
    nn.Linear: (SubnetLinear, ("in_features", "out_features")),
}


def convert_to_subnets(
    net: nn.Module,
    num_subnets: int,
    dense: Iterable[str] = (),
    shared_batchnorm: Iterable[str] = (),
) -> SubnetModel:
    """Make every Conv2d/Linear but ``dense`` a sparse layer with N masks, every BatchNorm2d
    switchable but those matching the fnmatch ``shared_batchnorm`` (one plain set that every
    sub-net trains, as the authors' CIFAR ResNet's stem and shortcuts). Weights are moved."""
    dense = set(dense)
    unknown = dense - {n for n, _ in net.named_modules()}
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not modules of the model")
    shared = set(shared_batchnorm_names(net, shared_batchnorm))

    def swap(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            new: nn.Module | None = None
            if isinstance(child, nn.BatchNorm2d) and name in shared:
                continue  # one plain BatchNorm for every sub-net
            if isinstance(child, nn.BatchNorm2d):
                new = SwitchableBatchNorm2d.from_batchnorm(child, num_subnets)
            elif name not in dense and type(child) in _SPARSE:
                cls, args = _SPARSE[type(child)]
                kwargs = {a: getattr(child, a) for a in args}
                new = cls(
                    **kwargs, bias=child.bias is not None, num_subnets=num_subnets, device="meta"
                )
                new.weight, new.bias = child.weight, child.bias
                new.masks = torch.ones_like(new.masks, device=child.weight.device)  # was meta
            if new is not None:
                setattr(parent, child_name, new)
            else:
                swap(child, name)

    swap(net, "")
    return SubnetModel(net, num_subnets)
