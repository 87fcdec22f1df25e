"""What differs between the two engines, behind one small interface.

:class:`~dist_ast.train.Trainer` runs the one training step; an engine (``DDPEngine``,
``DeepSpeedEngine``) owns only the wrapping (``forward``), ``backward(loss)``, the
gradients as the optimizer step sees them (a :class:`StepGrads` handed to the trainer's
update by ``step(update)``: DDP's all-reduced model gradients, or DeepSpeed's flat fp32
partitions with the reduce group GC sums over) and ``dense_grads`` for regrowth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from dist_ast.distributed.mask_sync import average_buffers
from dist_ast.distributed.setup import DistInfo
from dist_ast.sparsity.model import SubnetModel


class StepGrads(Protocol):
    """The gradients one optimizer step works on (see the module docstring)."""

    reduce_group: object | None  # GC's dot products are summed over it (partitioned)
    finite: torch.Tensor | None  # GradScaler's verdict on the gradients (None: none)

    def mask(self, subnets: list[int]) -> None:
        """g ← Σ_k m_k ⊙ g_k over the trained sub-nets (and unscaled)."""

    def checked(self) -> list[torch.Tensor]:
        """The gradients the non-finite check reads besides the loss."""

    def sparse(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """GC's input: the sparse weights' gradients and m_k (None: none in this call)."""

    def step(self, subnets: list[int]) -> None:
        """The masked optimizer update: only the trained sub-nets' weights move."""


Update = Callable[[StepGrads], "torch.Tensor | bool | None"]


class Engine:
    """The shared part; subclasses implement the interface of the module docstring."""

    model: SubnetModel
    dist: DistInfo

    def bind(self, optimizer, scaler) -> None:  # noqa: ANN001
        """The trainer's optimizer and GradScaler (DDP steps them; DeepSpeed has its own)."""

    def begin_step(self, dense_subnets: list[int]) -> None:
        """Before backward: the sub-nets whose dense gradient this step's regrowth needs."""

    def masks_changed(self, k: int) -> None:
        """Sub-net k's masks were replaced (drop what was cached from them)."""

    def end_step(self) -> None:
        """After the optimizer step: make BatchNorm statistics identical on every rank."""
        if self.dist.distributed:
            average_buffers(self.model)

    @property
    def step_bytes(self) -> int | None:
        """Gradient bytes all-reduced this step (None: not measured)."""
        return None
