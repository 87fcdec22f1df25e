"""Dynamic inference: load the N sub-nets once, switch between them at run time.

    model = DynamicModel.from_checkpoint("runs/demo/model.pt")
    model.set_subnet(2)          # a few attribute writes: no reload, no weight copy
    logits = model(x)

On dense kernels every sub-net costs the same time; sparsity pays off on sparse kernels
or an exported sub-net, so :meth:`DynamicModel.choose_subnet` takes the per-sub-net cost
the caller measured or estimated (docs/subnets.md has a latency-budget example).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dist_ast.config import RunConfig
from dist_ast.flops import layer_forward_flops
from dist_ast.sparsity.model import SubnetModel
from dist_ast.subnets_io import load_subnet_model


class DynamicModel(nn.Module):
    """N sub-nets behind one forward; ``set_subnet(k)`` picks which one runs."""

    def __init__(self, model: SubnetModel, config: RunConfig | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = config

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> DynamicModel:
        """Load a model.pt or DCP checkpoint once (see dist_ast.subnets_io)."""
        config, model = load_subnet_model(path, device)
        return cls(model, config)

    @property
    def num_subnets(self) -> int:
        return self.model.num_subnets

    @property
    def subnet(self) -> int:
        return self.model.subnet

    def set_subnet(self, k: int) -> DynamicModel:
        """Switch to sub-net k in place (microseconds); returns self for chaining."""
        self.model.set_subnet(k)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def sparsities(self) -> list[float]:
        """Measured sparsity of the sparse layers, per sub-net (from the masks)."""
        return [self.model.sparsity(k) for k in range(self.num_subnets)]

    @torch.no_grad()
    def dense_flops(self, sample: torch.Tensor) -> int:
        """Forward FLOPs per sample of the dense model (no layer scaled)."""
        return sum(layer_forward_flops(self.model.net, sample[:1]).values())

    @torch.no_grad()
    def subnet_flops(self, sample: torch.Tensor) -> list[int]:
        """Forward FLOPs per sample of each sub-net, every layer scaled by its density
        (what a kernel that skips zeros would do)."""
        per_layer = layer_forward_flops(self.model.net, sample[:1])
        modules = dict(self.model.net.named_modules())
        sparse = set(self.model.sparse_names)
        out = []
        for k in range(self.num_subnets):
            total = 0.0
            for name, f in per_layer.items():
                density = float(modules[name].masks[k].float().mean()) if name in sparse else 1.0
                total += f * density
            out.append(int(round(total)))
        return out

    @torch.no_grad()
    def measure_latency(self, sample: torch.Tensor, repeats: int = 10) -> list[float]:
        """Median seconds per forward of each sub-net, as run here (masked dense kernels:
        expect about equal numbers; run exported sparse sub-nets on the target instead)."""
        current, out = self.subnet, []
        for k in range(self.num_subnets):
            self.set_subnet(k)
            self.model(sample)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.model(sample)
                times.append(time.perf_counter() - t0)
            out.append(sorted(times)[len(times) // 2])
        self.set_subnet(current)
        return out

    def choose_subnet(self, budget: float, costs: Sequence[float]) -> int:
        """The least sparse (most accurate) sub-net whose cost fits ``budget``, switched
        to. ``costs[k]`` is sub-net k's cost in the budget's unit (ms, FLOPs, joules)."""
        if len(costs) != self.num_subnets:
            raise ValueError(f"need one cost per sub-net ({self.num_subnets}), got {len(costs)}")
        fitting = [k for k in range(self.num_subnets) if costs[k] <= budget]
        if not fitting:
            raise ValueError(
                f"no sub-net fits the budget {budget} (cheapest costs {min(costs)}); "
                "raise the budget or train a sparser sub-net"
            )
        k = min(fitting, key=lambda j: (self.sparsities()[j], j))
        self.set_subnet(k)
        return k
