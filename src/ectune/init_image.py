"""Reading the starting image of image-to-image sampling (`ectune sample --init-image`, `ECTPipeline(image=...)`).

Images become the model's channel count (grey or RGB) and, when square but of another size, its resolution
(bicubic); a non-square image is refused rather than distorted or cropped behind the user's back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


def pil_to_tensor(img: Image.Image, *, channels: int, resolution: int, name: str = "the image") -> Tensor:
    """[channels, resolution, resolution] float in [-1, 1] from a PIL image."""
    if img.width != img.height:
        raise ValueError(f"{name} is {img.width}×{img.height}; expected a square image (the model makes "
                         f"{resolution}×{resolution}): crop it first")
    img = img.convert("L" if channels == 1 else "RGB")
    if img.width != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1


def read_image(path: Path | str, *, channels: int, resolution: int) -> Tensor:
    """The image file at `path` as [channels, resolution, resolution] in [-1, 1]."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img, channels=channels, resolution=resolution, name=str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"--init-image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"--init-image {path}: not a readable image ({exc})") from None
