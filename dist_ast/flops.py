"""Training cost as the paper reports it (DESIGN §1.11): FLOPs of every forward and
backward pass, each layer's FLOPs scaled by its density at that step.

A layer's forward FLOPs are measured once (2 × multiply-adds per sample); backward is
counted as twice the forward (input and weight gradients), the convention of RigL and
GraNet. BatchNorm, activations and pooling are left out, as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dist_ast.sparsity.layers import SubnetSparseMixin
from dist_ast.sparsity.model import SubnetModel
from dist_ast.state_codecs import IntCounters


def layer_forward_flops(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Dense forward FLOPs per sample of every Conv2d and Linear, by module name."""
    flops: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs, output: torch.Tensor) -> None:
            w = mod.weight
            if isinstance(mod, nn.Conv2d):
                per_out = w.numel() // w.shape[0]  # (cin/groups)·kh·kw multiply-adds per output
                flops[name] = 2 * per_out * output[0].numel()
            else:
                flops[name] = 2 * w.numel() * (output[0].numel() // w.shape[0])

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(sample[:1])
    model.train(was_training)
    for h in hooks:
        h.remove()
    return flops


@dataclass
class TrainingFlops(IntCounters):
    """Cumulative training FLOPs of this run, and of training each sub-net on its own."""

    sparse_flops: dict[str, int]  # per sample, dense, by module name
    dense_flops: int  # per sample, layers never masked
    batch_size: int  # global
    total: int = 0
    individual: int = 0  # what N separate runs with these density trajectories would cost
    _step_cost: list[int] = field(default_factory=list)
    int_fields = ("total", "individual")  # the checkpointed state (IntCounters)

    @classmethod
    def measure(cls, model: SubnetModel, sample: torch.Tensor, batch_size: int) -> TrainingFlops:
        per_layer = layer_forward_flops(model.net, sample)
        sparse_names = {n for n, m in model.net.named_modules() if isinstance(m, SubnetSparseMixin)}
        sparse = {n: f for n, f in per_layer.items() if n in sparse_names}
        dense = sum(f for n, f in per_layer.items() if n not in sparse_names)
        new = cls(sparse_flops=sparse, dense_flops=dense, batch_size=batch_size)
        new.refresh(model)
        return new

    def refresh(self, model: SubnetModel) -> None:
        """Recompute each sub-net's cost of one step (after its masks changed)."""
        modules = dict(model.net.named_modules())
        self._step_cost = []
        for k in range(model.num_subnets):
            fwd = self.dense_flops + sum(
                f * float(modules[n].masks[k].float().mean()) for n, f in self.sparse_flops.items()
            )
            self._step_cost.append(int(round(3 * fwd * self.batch_size)))

    def step_cost(self, subnet: int) -> int:
        return self._step_cost[subnet]

    def add_step(self, subnets: list[int]) -> None:
        self.total += sum(self._step_cost[k] for k in subnets)
        self.individual += sum(self._step_cost)
