"""The in-memory dataset: uint8 images kept on the CPU until a batch is sent to the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DataError


@dataclass(repr=False)
class ImageDataset:
    """A whole image dataset held as one uint8 tensor.

    Attributes:
        images: uint8 [N, C, H, W], contiguous, on the CPU. Kept as uint8 (4x smaller than float32) and
            converted to [-1, 1] floats only on the device by `to_model_input`.
        labels: int64 [N] class ids in [0, num_classes), or None for an unlabelled dataset.
        num_classes: number of classes; 0 when unlabelled.
        description: where the data came from, for logs and checkpoint metadata.
    """

    images: Tensor
    labels: Tensor | None
    num_classes: int
    description: str

    def __post_init__(self) -> None:
        # These are programming errors of a loader, not user errors, but checking here means every loader
        # (and user code building a dataset by hand) gets the same guarantees the training loop relies on.
        im = self.images
        if not isinstance(im, Tensor) or im.dtype != torch.uint8 or im.ndim != 4:
            got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, Tensor) else type(im).__name__
            raise DataError(f"{self.description}: images must be a uint8 tensor [N, C, H, W], got {got}")
        if im.device.type != "cpu" or not im.is_contiguous():
            raise DataError(f"{self.description}: images must be a contiguous CPU tensor")
        if im.shape[0] == 0:
            raise DataError(f"{self.description}: the dataset has no images")
        if self.labels is None:
            if self.num_classes != 0:
                raise DataError(f"{self.description}: num_classes must be 0 for an unlabelled dataset")
            return
        lb = self.labels
        if lb.dtype != torch.int64 or lb.ndim != 1 or lb.shape[0] != im.shape[0]:
            raise DataError(
                f"{self.description}: labels must be int64 [{im.shape[0]}], got {lb.dtype} {tuple(lb.shape)}"
            )
        lo, hi = int(lb.min()), int(lb.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"{self.description}: labels span [{lo}, {hi}] but num_classes is {self.num_classes}"
            )

    @property
    def channels(self) -> int:
        """C: 1 (greyscale) or 3 (RGB)."""
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        """H (= W); the networks take square images only."""
        h, w = int(self.images.shape[2]), int(self.images.shape[3])
        if h != w:
            raise DataError(f"{self.description}: images are {h}x{w}, expected square images")
        return h

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        # The dataclass default would try to print the whole image tensor.
        n, c, h, w = self.images.shape
        return f"ImageDataset({n} x {c}x{h}x{w}, num_classes={self.num_classes}, {self.description!r})"


def pad_images(images: Tensor, resolution: int, *, where: str) -> Tensor:
    """Zero-pad uint8 [N, C, H, W] images, centred, to [N, C, resolution, resolution].

    With an odd margin the extra row/column goes to the bottom/right. Zero is black (-1 after
    `to_model_input`), which matches the MNIST-style backgrounds this is meant for (28 -> 32 for the
    UNets' power-of-two resolutions). Shrinking is refused: cropping would silently lose content.
    """
    h, w = int(images.shape[2]), int(images.shape[3])
    if resolution < h or resolution < w:
        raise DataError(
            f"data.resolution={resolution} is smaller than the native {h}x{w} of {where}; "
            f"use 0 (native) or a size >= {max(h, w)} (images are padded, never cropped)"
        )
    if h == resolution and w == resolution:
        return images
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = torch.zeros((images.shape[0], images.shape[1], resolution, resolution), dtype=images.dtype)
    out[:, :, top : top + h, left : left + w] = images
    return out


def load_batch(ds: ImageDataset, indices: Tensor) -> tuple[Tensor, Tensor | None]:
    """Gather one (per-rank) batch: uint8 images [B, C, H, W] and int64 labels [B] (or None).

    `indices` come from `global_indices`. The result stays uint8 on the CPU; pass it to
    `to_model_input` to move it to the device, where the float conversion is cheap.
    """
    if indices.ndim != 1 or indices.dtype != torch.int64:
        raise DataError(f"load_batch: indices must be an int64 vector, got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(ds)):
        raise DataError(
            f"load_batch: indices span [{int(indices.min())}, {int(indices.max())}] "
            f"but {ds.description} has {len(ds)} images"
        )
    images = ds.images.index_select(0, indices)
    labels = None if ds.labels is None else ds.labels.index_select(0, indices)
    return images, labels
