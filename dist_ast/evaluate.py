"""Evaluate every sub-net with its own masks and BatchNorm set; ranks split the
validation set and all-reduce the counts, so the result equals one process's."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from dist_ast.distributed.setup import DistInfo
from dist_ast.sparsity.model import SubnetModel


@torch.no_grad()
def evaluate_subnets(
    model: SubnetModel,
    val_loader,
    dist_info: DistInfo,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    subnets: list[int] | None = None,
) -> list[dict]:
    """[{index, top1, top5, samples}] for each sub-net."""
    was_training = model.training
    model.eval()
    results = []
    for k in subnets if subnets is not None else range(model.num_subnets):
        model.set_subnet(k)
        counts = torch.zeros(3, dtype=torch.float64, device=dist_info.device)
        for x, y in val_loader:
            with autocast():
                logits = model(x)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == y[:, None]
            counts += torch.tensor(
                [hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(y)],
                dtype=torch.float64,
                device=dist_info.device,
            )
        if dist_info.distributed:
            dist.all_reduce(counts)
        n = max(counts[2].item(), 1.0)
        results.append(
            {
                "index": k,
                "top1": counts[0].item() / n,
                "top5": counts[1].item() / n,
                "samples": int(counts[2].item()),
            }
        )
    model.train(was_training)
    return results
