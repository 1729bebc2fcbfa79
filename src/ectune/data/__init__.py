"""Image data for ectune: datasets held as uint8 tensors, resumable sampling, device conversion.

Sources (DataConfig.source): Fashion-MNIST from the Debian package or --data.path, MNIST-format IDX files,
EDM-layout image folders/zips, and torchvision datasets (optional dependency). Every loader returns an
`ImageDataset`; bad input raises `DataError` naming the file or option at fault.

Typical training-loop use::

    ds = open_dataset(cfg.data)
    idx = global_indices(len(ds), seed=seed, start=nimg, count=batch)  # the global batch; a rank takes its rows
    images_u8, labels = load_batch(ds, idx[rows])
    flips = xflip_mask(torch.arange(nimg, nimg + batch), seed=seed)
    x = to_model_input(images_u8, device=dev, xflip=cfg.data.xflip, flip_mask=flips[rows])
"""

from .convert import convert_images
from .dataset import ImageDataset, load_batch, pad_images
from .device import to_model_input
from .edm import load_edm_dataset
from .errors import DataError
from .idx import find_idx_files, load_fashion_mnist, load_idx_dataset, read_idx, write_idx
from .sampler import global_indices, xflip_mask
from .source import open_dataset
from .tv import TORCHVISION_DATASETS, load_torchvision_dataset

__all__ = [
    "DataError",
    "ImageDataset",
    "TORCHVISION_DATASETS",
    "convert_images",
    "find_idx_files",
    "global_indices",
    "load_batch",
    "load_edm_dataset",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_torchvision_dataset",
    "open_dataset",
    "pad_images",
    "read_idx",
    "to_model_input",
    "write_idx",
    "xflip_mask",
]
