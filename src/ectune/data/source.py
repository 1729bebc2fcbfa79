"""`open_dataset`: the one entry point from a DataConfig to an ImageDataset."""

from __future__ import annotations

import stat
from pathlib import Path

from ectune.config import DataConfig

from .dataset import ImageDataset, pad_images
from .edm import load_edm_dataset
from .errors import DataError
from .idx import load_fashion_mnist, load_idx_dataset
from .tv import load_torchvision_dataset


def _check_path_kind(path: Path) -> None:
    """A FIFO, device or socket would block or never end when read: only regular files and folders are data."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing: each loader names what it expected there
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "socket"
        raise DataError(f"--data.path {path} is a {kind}, expected a regular file or a directory")


def open_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the dataset `cfg` describes: uint8 [N, C, R, R] on the CPU, labels only if cfg.use_labels.

    cfg.resolution > 0 zero-pads the images, centred, to that size (e.g. Fashion-MNIST 28 -> 32); a size
    below the native one is refused. The result must be square (the networks take square images).
    """
    if cfg.split not in ("train", "test"):
        raise DataError(f"data.split={cfg.split!r}, expected 'train' or 'test'")
    if isinstance(cfg.resolution, bool) or not isinstance(cfg.resolution, int) or cfg.resolution < 0:
        raise DataError(f"data.resolution={cfg.resolution!r}, expected 0 (native) or a positive size")
    if cfg.path:
        _check_path_kind(Path(cfg.path))
    if cfg.source == "fashion-mnist":
        ds = load_fashion_mnist(cfg.path, split=cfg.split, use_labels=cfg.use_labels)
    elif cfg.source == "idx":
        if not cfg.path:
            raise DataError("data.source='idx' needs --data.path: a directory of MNIST-format files or an images file")
        ds = load_idx_dataset(cfg.path, split=cfg.split, use_labels=cfg.use_labels)
    elif cfg.source == "edm":
        if not cfg.path:
            raise DataError("data.source='edm' needs --data.path: a folder or .zip of images")
        if cfg.split != "train":
            # An EDM archive is one split; silently returning the training images as 'test' would be wrong.
            raise DataError("data.split='test' has no meaning for data.source='edm'; point --data.path at the test set")
        ds = load_edm_dataset(cfg.path, use_labels=cfg.use_labels)
    elif cfg.source == "latents":
        return _open_latents(cfg)
    elif cfg.source == "torchvision":
        if not cfg.name:
            raise DataError("data.source='torchvision' needs --data.name, e.g. CIFAR10, MNIST or FashionMNIST")
        ds = load_torchvision_dataset(
            cfg.name, root=cfg.path, split=cfg.split, use_labels=cfg.use_labels, download=cfg.download
        )
    else:
        raise DataError(f"data.source={cfg.source!r}, expected 'fashion-mnist', 'idx', 'edm', 'torchvision' or 'latents'")

    h, w = ds.images.shape[2:]
    if cfg.resolution and (h, w) != (cfg.resolution, cfg.resolution):
        r = cfg.resolution
        ds = ImageDataset(
            images=pad_images(ds.images, r, where=ds.description),
            labels=ds.labels,
            num_classes=ds.num_classes,
            description=f"{ds.description} padded {h}x{w} -> {r}x{r}",
        )
    h, w = ds.images.shape[2:]
    if h != w:
        raise DataError(f"{ds.description}: images are {h}x{w}; set data.resolution >= {max(h, w)} to pad them square")
    return ds


def _open_latents(cfg: DataConfig) -> ImageDataset:
    """An `ectune encode-latents` folder, checked against the VAE and normalisation the config records."""
    from .latents import check_matches_config, load_latent_dataset

    if not cfg.path:
        raise DataError("data.source='latents' needs --data.path: a folder written by `ectune encode-latents`")
    if cfg.split != "train":
        raise DataError("data.split='test' has no meaning for data.source='latents'; point --data.path at the test set")
    if cfg.resolution:
        raise DataError(f"data.resolution={cfg.resolution}: latents are never padded; use 0 with data.source='latents'")
    ds, meta = load_latent_dataset(cfg.path, use_labels=cfg.use_labels)
    check_matches_config(meta, Path(cfg.path), vae=cfg.vae, latent_mean=cfg.latent_mean, latent_std=cfg.latent_std)
    return ds
