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
    # Latent datasets (ectune.data.latents): `images` are float32 latents (the VAE posterior mean) and, when the
    # posterior was stored, `images_std` its std, from which `load_batch` draws a fresh latent per image seen.
    images_std: Tensor | None = None

    def __post_init__(self) -> None:
        # These are programming errors of a loader, not user errors, but checking here means every loader
        # (and user code building a dataset by hand) gets the same guarantees the training loop relies on.
        im = self.images
        if not isinstance(im, Tensor) or im.dtype not in (torch.uint8, torch.float32) or im.ndim != 4:
            got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, Tensor) else type(im).__name__
            raise DataError(f"{self.description}: images must be a uint8 (or float32 latent) tensor [N, C, H, W], got {got}")
        std = self.images_std
        if std is not None and (im.dtype != torch.float32 or not isinstance(std, Tensor) or std.dtype != torch.float32
                                or std.shape != im.shape):
            raise DataError(f"{self.description}: images_std must be float32 {tuple(im.shape)} beside float32 latents")
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
    def is_latent(self) -> bool:
        """Whether the 'images' are float latents rather than uint8 pixels."""
        return self.images.dtype == torch.float32

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


def load_batch(ds: ImageDataset, indices: Tensor, *, positions: Tensor | None = None,
               seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Gather one (per-rank) batch: uint8 images [B, C, H, W] and int64 labels [B] (or None).

    `indices` come from `global_indices`. The result stays uint8 on the CPU; pass it to
    `to_model_input` to move it to the device, where the float conversion is cheap.

    Latent datasets give float32 latents instead. Where the VAE posterior was stored (`images_std`) and the stream
    `positions` of the rows are given (like `xflip_mask`'s), row b is the draw mean + std·ε(seed, positions[b])
    (`ectune.data.latents.posterior_noise`): a fresh latent per image seen, the same whatever the batch or rank
    count. Without positions the posterior mean is returned.
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
    if ds.images_std is not None and positions is not None:
        from .latents import posterior_noise

        if positions.shape != indices.shape:
            raise DataError(f"load_batch: positions {tuple(positions.shape)} must match indices {tuple(indices.shape)}")
        eps = posterior_noise(positions, seed=seed, shape=tuple(images.shape[1:]))
        images = images + ds.images_std.index_select(0, indices) * eps
    return images, labels
