"""Demo data on board: scikit-learn's bundled handwritten digits, upscaled to 32x32.

1,797 real 8x8 scans (UCI optdigits); a fixed permutation splits them into 1,500 train
and 297 validation images. Three identical channels so that every model accepts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
TRAIN_SIZE = 1500
MEAN, STD = 0.3, 0.35  # of the upscaled images in [0, 1]


def _scans(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, 1, S, S] in [0, 1], y int64, train order, val order): the fixed split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, order[:TRAIN_SIZE], order[TRAIN_SIZE:]


def load_digits_tensors(image_size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {"train": (x, y), "val": (x, y)}, x float [n, 3, S, S] normalized, y int64."""
    x, y, tr, va = _scans(image_size)
    x = ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va])}


def load_digits_uint8(image_size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same split as uint8 RGB images [n, S, S, 3], for writing JPEG shards."""
    x, y, tr, va = _scans(image_size)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    x = x.permute(0, 2, 3, 1).contiguous()
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va])}
