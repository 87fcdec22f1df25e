"""Decoding and augmentation shared by the loaders: per-dataset normalization constants
and recipes (read by the wds transforms and the DALI pipeline alike), the seed mixer,
the PIL decoder, the torchvision transforms and the device-side normalizer.

Imports no other module of ``dist_ast.data`` (tests/test_architecture.py).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

# Per-dataset normalization (RGB, [0, 1] scale).
NORM = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits_shards": ((0.3, 0.3, 0.3), (0.35, 0.35, 0.35)),  # as dist_ast.data.digits
}
# Small-image recipe (random crop with padding, optional flip) for these; ImageNet's
# random-resized crop for the rest.
SMALL = {"cifar10": {"pad": 4, "flip": True}, "digits_shards": {"pad": 2, "flip": False}}
STORED_SMALL_SIZE = 32  # digits and CIFAR shards hold 32x32 images


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (SeedSequence is stable across numpy versions)."""
    ss = np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def decode_jpeg(jpg: bytes):
    """JPEG bytes -> PIL RGB image; raises on data that does not decode."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpg))
    im.load()
    return im.convert("RGB") if im.mode != "RGB" else im


def build_transform(dataset: str, train: bool, image_size: int, rrc_min: float):
    """torchvision transform PIL RGB -> uint8 CHW tensor (normalization happens on the
    device, after the batch arrives)."""
    from torchvision import transforms as T

    to_tensor = T.PILToTensor()
    if dataset in SMALL:
        small = SMALL[dataset]
        ops: list[Any] = []
        if image_size != STORED_SMALL_SIZE:
            ops.append(T.Resize((image_size, image_size)))
        if train:
            ops.append(T.RandomCrop(image_size, padding=small["pad"]))
            if small["flip"]:
                ops.append(T.RandomHorizontalFlip())
        return T.Compose([*ops, to_tensor])
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(rrc_min, 1.0), ratio=(3 / 4, 4 / 3)),
                T.RandomHorizontalFlip(),
                to_tensor,
            ]
        )
    return T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), to_tensor])


class Normalizer:
    """uint8 NCHW batch -> float32 normalized, on the given device. For CUDA training the
    workers ship uint8 and this runs on the GPU; for CPU training it runs in the workers
    (single-threaded there, in parallel with the training step)."""

    def __init__(self, dataset: str, device: torch.device) -> None:
        mean, std = NORM.get(dataset, NORM["imagenet"])
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std
