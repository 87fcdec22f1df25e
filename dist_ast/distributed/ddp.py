"""Wrap the SubnetModel for data-parallel training: :class:`DDPEngine`, the DDP side of
the engine interface (:mod:`dist_ast.distributed.engine`).

* Masks are not DDP buffers: rank 0 decides them and broadcasts them bit-packed after an
  update (:mod:`~dist_ast.distributed.mask_sync`); DDP would re-send them every forward.
* ``broadcast_buffers=False``: after every step BatchNorm's running statistics are
  averaged over ranks (``average_buffers``), so ranks agree and use every rank's samples;
  DDP's default (rank 0's at the next forward) leaves them different after the last step.
* Gradients go through the masked compact all-reduce hook (:mod:`~.comm_hook`) unless
  ``engine.compact_allreduce=false``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ast.config import EngineConfig
from dist_ast.distributed.comm_hook import MaskedAllReduceState, masked_allreduce_hook
from dist_ast.distributed.engine import Engine, Update
from dist_ast.distributed.mask_sync import verify_masks
from dist_ast.distributed.setup import DistInfo
from dist_ast.sparsity.model import SubnetModel


class ModelGrads:
    """The model's own gradients (all-reduced by DDP's backward), as the step sees them."""

    reduce_group = None

    def __init__(self, engine: DDPEngine) -> None:
        self.engine, self.model = engine, engine.model
        self.finite: torch.Tensor | None = None

    def mask(self, subnets: list[int]) -> None:
        weights, per_subnet = self.model.sparse_weights(), self.engine.per_subnet
        if len(subnets) == 1:  # out of place: the dense gradient stays for regrowth
            masked = torch._foreach_mul(per_subnet[0], self.model.masks(subnets[0]))
        else:
            masked = [torch.zeros_like(w) for w in weights]
            for k, grads in zip(subnets, per_subnet, strict=True):
                torch._foreach_addcmul_(masked, grads, self.model.masks(k))
        for w, g in zip(weights, masked, strict=True):
            w.grad = g
        scaler = self.engine.scaler
        if scaler is not None:
            scaler.unscale_(self.engine.optimizer)
            dense = [
                g
                for k, g in zip(subnets, self.engine.per_subnet, strict=True)
                if k in self.engine.dense_subnets
            ]
            if dense:  # the kept dense gradients: unscale in place (a mask-update step)
                inv = 1.0 / scaler.get_scale()
                for grads in dense:
                    torch._foreach_mul_(grads, inv)
            # The scaler skips the step when any gradient (not only the sparse ones) is
            # inf/nan: its own found-inf flags, summed on the device, tell GC to leave
            # g_prev and the counters alone on that step. scaler.step reads them once.
            found = scaler._found_inf_per_device(self.engine.optimizer)
            self.finite = sum(found.values()) == 0

    def checked(self) -> list[torch.Tensor]:
        if self.engine.scaler is not None:  # its own skip covers the gradients
            return []
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def sparse(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [w.grad for w in self.model.sparse_weights()], self.model.masks(k)

    def step(self, subnets: list[int]) -> None:
        update_masks = self.model.update_masks(subnets)
        scaler, optimizer = self.engine.scaler, self.engine.optimizer
        if scaler is not None:
            scaler.step(optimizer, update_masks)
            scaler.update()
        else:
            optimizer.step(update_masks)


class DDPEngine(Engine):
    """DDP (or one process): the trainer's optimizer on the model's gradients."""

    def __init__(
        self,
        model: SubnetModel,
        dist: DistInfo,
        module: nn.Module,
        hook=None,  # noqa: ANN001
    ) -> None:
        self.model, self.dist, self.module = model, dist, module
        self.hook: MaskedAllReduceState | None = hook
        self.optimizer = self.scaler = None
        self.per_subnet: list[list[torch.Tensor]] = []  # each backward's sparse gradients
        self.dense_subnets: list[int] = []
        self.grads: ModelGrads | None = None

    def bind(self, optimizer, scaler) -> None:  # noqa: ANN001
        self.optimizer, self.scaler = optimizer, scaler

    def begin_step(self, dense_subnets: list[int]) -> None:
        """The all-reduce sends only m_k's entries unless sub-net k regrows this step."""
        self.dense_subnets, self.per_subnet = list(dense_subnets), []
        if self.hook is not None:
            self.hook.begin_step(dense_subnets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward (scaled under fp16); each sub-net's sparse-weight gradient is kept
        apart (a second sub-net's backward starts from none)."""
        weights = self.model.sparse_weights()
        if self.per_subnet:
            for w in weights:
                w.grad = None
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.per_subnet.append([w.grad for w in weights])

    def step(self, update: Update) -> tuple[bool, torch.Tensor | bool | None]:
        self.grads = ModelGrads(self)
        return True, update(self.grads)

    def dense_grads(self, subnets: list[int], k: int) -> list[torch.Tensor] | None:
        """Sub-net k's dense gradient (None when the GradScaler skipped this step: the
        update only prunes; this read is on a mask-update step only)."""
        assert self.grads is not None
        if self.grads.finite is not None and not bool(self.grads.finite):
            return None
        return self.per_subnet[subnets.index(k)]

    def masks_changed(self, k: int) -> None:
        if self.hook is not None:
            self.hook.masks_changed(k)

    @property
    def step_bytes(self) -> int | None:
        return None if self.hook is None else self.hook.step_bytes


def mask_buffer_names(model: SubnetModel) -> list[str]:
    return [f"{name}.masks" for name, m in model.named_modules() if hasattr(m, "masks")]


def wrap_model(
    model: SubnetModel, dist_info: DistInfo, engine: EngineConfig
) -> tuple[nn.Module, DDPEngine]:
    """DDP over the model (masks excluded, no buffer broadcast, masked all-reduce hook),
    or the model itself in one process; and the engine the trainer's step calls."""
    if not dist_info.distributed:
        return model, DDPEngine(model, dist_info, model)
    DDP._set_params_and_buffers_to_ignore_for_model(model, mask_buffer_names(model))
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    # newer torch renames broadcast_buffers to forward_sync_buffers
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
    return ddp, DDPEngine(model, dist_info, ddp, hook)
