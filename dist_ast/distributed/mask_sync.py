"""Rank 0 decides, everyone follows (DESIGN §2, "Masks").

Prune-and-regrow runs on rank 0 from the all-reduced dense gradient; the new masks are
broadcast bit-packed (1 bit per weight: 3.2 MB for all of ResNet-50), every rank
installs them, and every rank then verifies a checksum of *all* masks of *all* sub-nets
against rank 0's. A mismatch stops the run with an error naming the layer and sub-net:
replicas that train different sparse models silently diverge (GraNet's and SparseML's
DDP bug), which is worse than stopping.

The checksum of one mask is (number of live weights, a 64-bit hash summed over the live
flat positions). Moving, adding or removing one live weight changes it; two changes
cancel only with probability about 2^-64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ast.sparsity.model import SubnetModel

_BIT_WEIGHTS = [1 << i for i in range(8)]
_MIX_A = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_MIX_B = 0xBF58476D1CE4E5B9 - (1 << 64)


def pack_bits(masks: list[torch.Tensor]) -> torch.Tensor:
    """Bool tensors → one uint8 tensor, 8 mask entries per byte (little-endian bits)."""
    flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_bits`: bool tensors shaped like ``like``."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) & weights).ne(0).reshape(-1)
    out, offset = [], 0
    for t in like:
        out.append(bits[offset : offset + t.numel()].view(t.shape).clone())
        offset += t.numel()
    return out


def mask_checksum(mask: torch.Tensor) -> tuple[int, int]:
    """(live count, wrapped int64 sum of a mixing hash of the live flat positions)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    h = idx * _MIX_A
    h = h ^ (h >> 31)
    h = h * _MIX_B
    h = h ^ (h >> 29)
    return int(idx.numel()), int(h.sum())


def model_checksums(model: SubnetModel) -> torch.Tensor:
    """int64 [N, L, 2]: the checksum of every sub-net's mask of every sparse layer."""
    rows = [[mask_checksum(m) for m in model.masks(k)] for k in range(model.num_subnets)]
    return torch.tensor(rows, dtype=torch.int64)


def verify_masks(model: SubnetModel, group: dist.ProcessGroup | None = None) -> None:
    """Raise RuntimeError on every rank if any rank's masks differ from rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    mine = model_checksums(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)  # gloo and NCCL: on the CPU for gloo
    names = model.sparse_names
    for rank, theirs in enumerate(gathered[1:], start=1):
        diff = (theirs != gathered[0]).any(dim=2).nonzero().tolist()
        if diff:
            k, layer = diff[0]
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise RuntimeError(
                f"mask mismatch: layer {names[layer]!r}, sub-net {k}: rank {rank} has "
                f"{int(theirs[k, layer, 0])} live weights (checksum {int(theirs[k, layer, 1])}), "
                f"rank 0 has {int(gathered[0][k, layer, 0])} "
                f"(checksum {int(gathered[0][k, layer, 1])}){more}. The replicas no longer train "
                "the same sparse model; stopping"
            )


def broadcast_masks(
    masks: list[torch.Tensor] | None,
    like: list[torch.Tensor],
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Rank ``src``'s ``masks`` (bool, shaped like ``like``; None elsewhere) on every
    rank, sent bit-packed."""
    nbytes = (sum(t.numel() for t in like) + 7) // 8
    device = like[0].device
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    if dist.get_rank() == src:
        assert masks is not None
        packed = pack_bits([m.to(device) for m in masks])
    else:
        packed = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.broadcast(packed, src=src, group=group)
    return [m.to(t.device) for m, t in zip(unpack_bits(packed, like), like, strict=True)]


def average_buffers(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) over ranks (no
    SyncBatchNorm; see :mod:`~dist_ast.distributed.ddp`). Bool masks are untouched."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
