"""torchvision datasets as ImageDatasets. torchvision is optional and imported only when this source is used.

Only the datasets listed in `TORCHVISION_DATASETS` are supported: each has a known constructor and storage
layout, so the whole dataset can be copied out of its `.data` array in one go instead of decoding it image
by image through __getitem__ (and no class is looked up from an arbitrary user string). Note that some
torchvision loaders (CIFAR) unpickle their own downloaded batch files; that happens inside torchvision, on
files it fetched from the dataset's official source, and is the reason the EDM/IDX sources are preferred for
anything a user hands over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .dataset import ImageDataset
from .errors import DataError

# name -> (how the split is passed to the constructor, layout of `.data`, attribute holding the labels)
_Split = Literal["train_flag", "split_arg"]
TORCHVISION_DATASETS: dict[str, tuple[_Split, str, str]] = {
    "MNIST": ("train_flag", "NHW", "targets"),
    "FashionMNIST": ("train_flag", "NHW", "targets"),
    "KMNIST": ("train_flag", "NHW", "targets"),
    "CIFAR10": ("train_flag", "NHWC", "targets"),
    "CIFAR100": ("train_flag", "NHWC", "targets"),
    "SVHN": ("split_arg", "NCHW", "labels"),
    "STL10": ("split_arg", "NCHW", "labels"),
}
DEFAULT_ROOT = "~/.cache/ectune/torchvision"


def _import_torchvision() -> Any:
    try:
        import torchvision  # noqa: PLC0415 - optional dependency, imported only when needed
    except ImportError:
        raise DataError(
            "data.source='torchvision' needs torchvision, which is not installed: `pip install torchvision` "
            "(PyPI's torchvision wheels are built for one torch release, so install the version matching "
            f"torch {torch.__version__}), or use data.source 'edm'/'idx' instead"
        ) from None
    except Exception as e:  # a wheel built for another torch fails at import with operator/ABI errors
        raise DataError(
            f"torchvision is installed but failed to import ({e}); it probably does not match "
            f"torch {torch.__version__}: reinstall the matching torchvision version"
        ) from None
    return torchvision


def array_to_nchw(data: Any, layout: str, *, where: str) -> torch.Tensor:
    """A dataset's `.data` (numpy array or tensor, NHW / NHWC / NCHW) as contiguous uint8 [N, C, H, W]."""
    t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if t.dtype != torch.uint8 or t.ndim != len(layout):
        raise DataError(f"{where}: .data is {t.dtype} {tuple(t.shape)}, expected uint8 {layout}")
    if layout == "NHW":
        t = t[:, None]
    elif layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] not in (1, 3):
        raise DataError(f"{where}: images have {t.shape[1]} channels, expected 1 or 3")
    return t.contiguous().cpu()


def load_torchvision_dataset(
    name: str, *, root: str, split: str, use_labels: bool, download: bool
) -> ImageDataset:
    """Load torchvision.datasets.<name> (see TORCHVISION_DATASETS) entirely into a uint8 ImageDataset."""
    if name not in TORCHVISION_DATASETS:
        raise DataError(
            f"data.name={name!r} is not a supported torchvision dataset; expected one of "
            + ", ".join(TORCHVISION_DATASETS)
        )
    tv = _import_torchvision()
    split_kind, layout, label_attr = TORCHVISION_DATASETS[name]
    root_path = Path(os.path.expanduser(root or DEFAULT_ROOT))
    kwargs: dict[str, Any] = {"download": download}
    if split_kind == "train_flag":
        kwargs["train"] = split == "train"
    else:
        kwargs["split"] = split
    try:
        ds = getattr(tv.datasets, name)(str(root_path), **kwargs)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted. You can use download=True"
        hint = "" if download else "; set --data.download to fetch it (needs internet)"
        raise DataError(f"torchvision {name} ({split}) could not be loaded from {root_path}: {e}{hint}") from None
    where = f"torchvision {name} {split} at {root_path}"
    images = array_to_nchw(ds.data, layout, where=where)
    if not use_labels:
        return ImageDataset(images=images, labels=None, num_classes=0, description=where)
    raw = getattr(ds, label_attr, None)
    if raw is None:
        raise DataError(f"data.use_labels is set but {where} has no labels")
    labels = torch.as_tensor(np.asarray(raw), dtype=torch.int64).reshape(-1)
    if labels.shape[0] != images.shape[0] or int(labels.min()) < 0:
        # e.g. STL10's 'unlabeled' images carry label -1
        raise DataError(f"data.use_labels is set but {where} has missing or negative labels")
    classes = getattr(ds, "classes", None)
    num_classes = len(classes) if classes else int(labels.max()) + 1
    return ImageDataset(images=images, labels=labels, num_classes=num_classes, description=where)
