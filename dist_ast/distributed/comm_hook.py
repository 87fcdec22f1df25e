"""Masked compact all-reduce: a DDP communication hook that sends only the active
sub-net's gradient entries (DESIGN §2, "Gradients").

In step t only the entries of m_k of each sparse weight are applied (the rest is masked
away by the trainer), so all-reducing the other entries is wasted bandwidth. Per DDP
bucket the hook packs the entries of m_k (and every entry of the non-sparse parameters
in the bucket: biases, BatchNorm, dense layers) into one compact buffer, all-reduces it,
and scatters it back. Entries outside m_k are *not* communicated: they come back holding
this rank's local gradient, and the trainer's masking step (which one process needs as
well) zeroes them, so the optimizer sees exactly the dense all-reduce masked to m_k;
zeroing them here would cost a third memory pass over every bucket. Masks are identical on
every rank (rank 0 decides them, see :mod:`dist_ast.distributed.mask_sync`), so the
indices are never exchanged: each rank computes the same index list from its own masks.

Index lists are cached per (bucket, sub-net) and rebuilt when that sub-net's masks
change (:meth:`MaskedAllReduceState.masks_changed`, or any in-place write to the mask
buffers, e.g. a checkpoint load, seen through their version counters) or the bucket's
parameters change
(DDP rebuilds its buckets after the first iteration; we key the cache on the bucket's
parameter identities, so no warm-up iteration is needed).

A plain (dense) all-reduce is used instead when

* the step needs the dense gradient of the sub-net (prune-and-regrow ranks inactive
  positions by it), announced with :meth:`MaskedAllReduceState.begin_step`, or
* the bucket's active density exceeds ``max_density``: gathering and scattering are
  memory passes over the whole bucket, and above some density they cost more than the
  bytes they save.

DDP hands the hook the *sum* of nothing: the bucket holds this rank's un-divided
gradient, so we divide by the world size (as the built-in ``allreduce_hook`` does).
Bytes put on the wire (the payload of each all-reduce) are counted per step and in total.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ast.sparsity.layers import memory_order
from dist_ast.sparsity.model import SubnetModel

log = logging.getLogger(__name__)


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
        self.total_bytes = 0
        self.total_dense_bytes = 0

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
        """Changes whenever sub-net ``subnet``'s masks may have: masks_changed(), or any
        in-place write to a mask buffer (the updater's set_masks, a checkpoint load),
        which bumps the tensor's version counter, or a replaced buffer."""
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
        self.total_dense_bytes += dense_bytes
        subnet = self.model.subnet
        plan = None
        if self.enabled and subnet not in self.dense_subnets:
            plan = self.plan(key, buffer, params, subnet)
        if plan is None or not plan.compact:
            self._count(dense_bytes)
            buffer.div_(ws)
            work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        index = plan.index
        packed = buffer.index_select(0, index).div_(ws)
        self._count(packed.numel() * packed.element_size())
        work = dist.all_reduce(packed, group=self.process_group, async_op=True)
        # No zeroing pass over the bucket: entries outside m_k keep this rank's local
        # gradient and the trainer's masking (train_step, step 2) zeroes them, as it must
        # in one process too. Zeroing here would be a third memory pass over the bucket.

        def unpack(fut: torch.futures.Future) -> torch.Tensor:
            return buffer.index_copy_(0, index, fut.value()[0])

        return work.get_future().then(unpack)

    def _count(self, nbytes: int) -> None:
        self.step_bytes += nbytes
        self.total_bytes += nbytes


def masked_allreduce_hook(
    state: MaskedAllReduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp.register_comm_hook(state, masked_allreduce_hook)``."""
    return state.allreduce(bucket.index(), bucket.buffer(), bucket.parameters())
