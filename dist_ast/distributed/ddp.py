"""Wrap the SubnetModel for data-parallel training."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ast.config import EngineConfig
from dist_ast.distributed.setup import DistInfo
from dist_ast.sparsity.model import SubnetModel


def wrap_model(model: SubnetModel, dist_info: DistInfo, engine: EngineConfig) -> nn.Module:
    """DDP over the model, masks excluded from buffer broadcasts (rank 0 decides them and
    broadcasts them bit-packed after each update instead). BatchNorm running statistics
    are DDP buffers: rank 0's are broadcast at every forward."""
    if not dist_info.distributed:
        return model
    ignore = [f"{name}.masks" for name, m in model.named_modules() if hasattr(m, "masks")]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, bucket_cap_mb=engine.bucket_cap_mb)
