"""Wrap the SubnetModel for data-parallel training, and the per-step plumbing the trainer
calls around it (:class:`GradSync`).

Choices, and why:

* Masks are excluded from DDP's buffers: rank 0 decides them and broadcasts them
  bit-packed after each update (:mod:`dist_ast.distributed.mask_sync`); DDP would
  otherwise re-send every mask of every sub-net at every forward.
* BatchNorm running statistics: ``broadcast_buffers=False``; each rank normalizes its
  own batch and after every step the running statistics are *averaged* over ranks
  (:func:`~dist_ast.distributed.mask_sync.average_buffers`, one small all-reduce). Every
  rank then holds identical statistics, so evaluation and checkpoints agree across
  ranks, and the running mean uses all ranks' samples rather than rank 0's alone (the
  mean of per-rank means is the global-batch mean). DDP's default, rank 0's statistics
  broadcast at the next forward, leaves the ranks different after the last step.
* Gradients go through the masked compact all-reduce hook
  (:mod:`dist_ast.distributed.comm_hook`) unless ``engine.compact_allreduce=false``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ast.config import EngineConfig
from dist_ast.distributed.comm_hook import MaskedAllReduceState, masked_allreduce_hook
from dist_ast.distributed.mask_sync import average_buffers, broadcast_masks, verify_masks
from dist_ast.distributed.setup import DistInfo
from dist_ast.sparsity.model import SubnetModel
from dist_ast.sparsity.updater import MaskUpdater


@dataclass
class GradSync:
    """What the trainer tells the data-parallel machinery around one step.

    Works for one process too (then it only runs the mask update locally).
    """

    model: SubnetModel
    dist: DistInfo
    hook: MaskedAllReduceState | None = None
    owns_step = False  # DeepSpeed's subclass runs the whole step (train_step)

    def begin_step(self, dense_subnets: list[int]) -> None:
        """Before backward: the sub-nets whose mask update this step needs the dense
        all-reduced gradient of (the hook sends only m_k's entries otherwise)."""
        if self.hook is not None:
            self.hook.begin_step(dense_subnets)

    def update_masks(
        self,
        updater: MaskUpdater,
        k: int,
        step: int,
        dense_grads: list[torch.Tensor] | None,
        optimizer,
    ) -> int:
        """Rank 0 decides sub-net k's new masks, broadcasts them bit-packed, every rank
        installs them and checks the checksum of all masks. Returns the fresh-weight count.
        """
        new = updater.decide(k, step, dense_grads) if self.dist.is_main else None
        if self.dist.distributed:
            new = broadcast_masks(new, self.model.masks(k))
        assert new is not None
        reset = updater.apply(k, new, optimizer)
        if self.hook is not None:
            self.hook.masks_changed(k)
        if self.dist.distributed:
            verify_masks(self.model)
        return reset

    def end_step(self) -> None:
        """After the optimizer step: make BatchNorm statistics identical on every rank."""
        if self.dist.distributed:
            average_buffers(self.model)

    @property
    def step_bytes(self) -> int | None:
        """Gradient bytes all-reduced this step (None without the hook)."""
        return None if self.hook is None else self.hook.step_bytes


def mask_buffer_names(model: SubnetModel) -> list[str]:
    return [f"{name}.masks" for name, m in model.named_modules() if hasattr(m, "masks")]


def wrap_model(
    model: SubnetModel, dist_info: DistInfo, engine: EngineConfig
) -> tuple[nn.Module, GradSync]:
    """DDP over the model (masks excluded, no buffer broadcast, masked all-reduce hook),
    or the model itself in one process; and the step plumbing for the trainer."""
    if not dist_info.distributed:
        return model, GradSync(model, dist_info)
    DDP._set_params_and_buffers_to_ignore_for_model(model, mask_buffer_names(model))
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    # No buffer broadcast at each forward (see the module docstring); newer torch renames
    # the switch to forward_sync_buffers.
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DDP(model, device_ids=device_ids, bucket_cap_mb=engine.bucket_cap_mb, **no_sync)
    verify_masks(model)  # same seed on every rank; catch a divergent start right away
    hook = None
    if engine.compact_allreduce:
        hook = MaskedAllReduceState(model, max_density=engine.compact_max_density)
        ddp.register_comm_hook(hook, masked_allreduce_hook)
    return ddp, GradSync(model, dist_info, hook)
