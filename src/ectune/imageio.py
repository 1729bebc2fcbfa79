"""Writing generated images: a PNG grid, a folder of PNGs, or an .npz array (uint8 NHWC, like EDM/ADM)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from .runtime.checkpoint import atomic_write


def grid_image(images_u8: Tensor, *, cols: int | None = None) -> Image.Image:
    """uint8 [N, C, H, W] tiled into one image, `cols` per row (square-ish by default)."""
    n, c, h, w = images_u8.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        y, x = divmod(i, cols)
        canvas[y * h : (y + 1) * h, x * w : (x + 1) * w] = arr[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_images(images_u8: Tensor, out: Path | str, *, cols: int | None = None) -> Path:
    """Save to `out`: *.png → one grid (`cols` per row), *.npz → array 'arr_0' [N, H, W, C] uint8, anything else →
    a folder of PNGs."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        buf = io.BytesIO()
        grid_image(images_u8, cols=cols).save(buf, format="PNG")
        atomic_write(out, lambda f: f.write(buf.getvalue()))
    elif out.suffix.lower() == ".npz":
        buf = io.BytesIO()
        np.savez(buf, images_u8.permute(0, 2, 3, 1).cpu().numpy())
        atomic_write(out, lambda f: f.write(buf.getvalue()))
    else:
        out.mkdir(parents=True, exist_ok=True)
        arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
        for i, a in enumerate(arr):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / f"{i:06d}.png")
    return out
