"""Masked compact all-reduce: a DDP communication hook that sends only the active
sub-net's gradient entries (DESIGN §2, "Gradients").

Per DDP bucket the hook packs the entries of m_k (and every entry of the bucket's
non-sparse parameters) into one buffer, all-reduces it and scatters it back. Entries
outside m_k keep this rank's local gradient: the trainer's masking, needed in one process
too, zeroes them (zeroing here would be a third memory pass over the bucket). Masks are
identical on every rank, so each computes the same index list and none is exchanged.
Index lists are cached per (bucket, sub-net), keyed on the bucket's parameters (DDP
rebuilds buckets after the first iteration) and on the masks' version counters (any
in-place write, e.g. a checkpoint load, invalidates them).

A plain all-reduce is used when the step needs the sub-net's dense gradient (regrowth,
announced by ``begin_step``) or the bucket's active density exceeds ``max_density``
(above it, gathering and scattering cost more than the bytes they save). The bucket holds
the un-divided local gradient, so we divide by the world size as ``allreduce_hook`` does.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ast.sparsity.layers import memory_order
from dist_ast.sparsity.model import SubnetModel


@dataclass
class _BucketPlan:
    """How to pack one bucket for one sub-net."""

    signature: tuple
    version: tuple  # (explicit counter, the masks' in-place version counters)
    index: torch.Tensor | None  # flat positions to send; None = send the whole bucket
    active: int  # entries sent when compact

    @property
    def compact(self) -> bool:
        return self.index is not None


class MaskedAllReduceState:
    """State of the hook: masks to read, caches, the dense-step flag and byte counters."""

    def __init__(
        self,
        model: SubnetModel,
        process_group: dist.ProcessGroup | None = None,
        *,
        max_density: float = 0.6,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.process_group = process_group
        self.max_density = max_density
        self.enabled = enabled
        # id(weight) -> its position among the sparse layers (masks are read live: they
        # change in place)
        self._layer = {id(w): i for i, w in enumerate(model.sparse_weights())}
        self._versions = [0] * model.num_subnets
        self._plans: dict[tuple[int, int], _BucketPlan] = {}
        self.dense_subnets: frozenset[int] = frozenset()
        self.step_bytes = 0  # payload bytes all-reduced since begin_step
        self.step_dense_bytes = 0  # what plain all-reduces of the same buckets would send

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    # -- what the trainer tells us ------------------------------------------------------
    def begin_step(self, dense_subnets: tuple[int, ...] | list[int] = ()) -> None:
        """Start a step; backward passes of ``dense_subnets`` all-reduce dense gradients."""
        self.dense_subnets = frozenset(dense_subnets)
        self.step_bytes = 0
        self.step_dense_bytes = 0

    def masks_changed(self, subnet: int | None = None) -> None:
        """Drop the cached index lists of ``subnet`` (all sub-nets when None)."""
        for k in range(self.model.num_subnets) if subnet is None else [subnet]:
            self._versions[k] += 1

    # -- planning -----------------------------------------------------------------------
    def plan(
        self, key: int, buffer: torch.Tensor, params: list[torch.Tensor], subnet: int
    ) -> _BucketPlan:
        """The cached packing plan of bucket ``key`` for ``subnet`` (rebuilt when stale)."""
        signature = (buffer.numel(), tuple(id(p) for p in params))
        version = self._version(subnet)
        plan = self._plans.get((key, subnet))
        if plan is not None and plan.signature == signature and plan.version == version:
            return plan
        plan = self._build_plan(signature, version, buffer, params, subnet)
        self._plans[(key, subnet)] = plan
        return plan

    @torch.no_grad()
    def _version(self, subnet: int) -> tuple:
        """Changes whenever sub-net ``subnet``'s masks may have (see the module docstring)."""
        masks = self.model.masks(subnet)
        return (
            self._versions[subnet],
            tuple((m.data_ptr(), m._version) for m in masks),
        )

    def _build_plan(
        self,
        signature: tuple,
        version: tuple,
        buffer: torch.Tensor,
        params: list[torch.Tensor],
        subnet: int,
    ) -> _BucketPlan:
        n = buffer.numel()
        keep = torch.ones(n, dtype=torch.bool, device=buffer.device)
        masks = self.model.masks(subnet)
        offset, has_sparse = 0, False
        for p in params:  # DDP lays a bucket out as its parameters' gradients, in order
            i = self._layer.get(id(p))
            if i is not None:
                keep[offset : offset + p.numel()] = memory_order(masks[i], like=p)
                has_sparse = True
            offset += p.numel()
        if offset != n:
            raise RuntimeError(
                f"DDP bucket holds {n} elements but its parameters {offset}: the hook cannot "
                "map gradients to masks (unexpected bucket layout)"
            )
        active = int(keep.sum()) if has_sparse else n
        if not has_sparse or active > self.max_density * n:
            return _BucketPlan(signature, version, None, active)
        index = keep.nonzero().squeeze(1)
        return _BucketPlan(signature, version, index, active)

    # -- the all-reduce -----------------------------------------------------------------
    def allreduce(
        self, key: int, buffer: torch.Tensor, params: list[torch.Tensor]
    ) -> torch.futures.Future[torch.Tensor]:
        """All-reduce (average) one flat bucket; compact unless the step needs it dense."""
        ws = self.world_size
        dense_bytes = buffer.numel() * buffer.element_size()
        self.step_dense_bytes += dense_bytes
        subnet = self.model.subnet
        plan = None
        if self.enabled and subnet not in self.dense_subnets:
            plan = self.plan(key, buffer, params, subnet)
        if plan is None or not plan.compact:
            self.step_bytes += dense_bytes
            buffer.div_(ws)
            work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        index = plan.index
        packed = buffer.index_select(0, index).div_(ws)
        self.step_bytes += packed.numel() * packed.element_size()
        work = dist.all_reduce(packed, group=self.process_group, async_op=True)
        # entries outside m_k keep the local gradient: the trainer's masking zeroes them

        def unpack(fut: torch.futures.Future) -> torch.Tensor:
            return buffer.index_copy_(0, index, fut.value()[0])

        return work.get_future().then(unpack)


def masked_allreduce_hook(
    state: MaskedAllReduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp.register_comm_hook(state, masked_allreduce_hook)``."""
    return state.allreduce(bucket.index(), bucket.buffer(), bucket.parameters())
