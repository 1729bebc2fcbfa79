"""EDM-style image datasets: a folder or .zip of PNG/JPEG files plus an optional dataset.json.

This is the layout of NVlabs/edm's dataset_tool, so the same archives work with both code bases:

    dataset.zip (or a folder)
      00000/img00000000.png        any nested relative paths; images are ordered by relative path
      ...
      dataset.json                 optional: {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}

All images must share one size (any resolution) and one channel count. Pixel modes are normalised when the
meaning is unambiguous and rejected otherwise:
  * L (greyscale) -> 1 channel; RGB -> 3 channels; 1-bit -> L; CMYK/YCbCr/LAB/HSV and palette (P) -> RGB.
  * An alpha channel (LA, RGBA, PA, P with transparency) is dropped only when every pixel is fully opaque;
    real transparency has no single right background, so such images are refused rather than guessed at.
  * 16-bit and float images (I;16, I, F) are refused: rescaling them to 8 bits is a choice the user makes.
Files are decoded in-process by a small thread pool (Pillow releases the GIL while decoding). Nothing is
unpickled: only image bytes and JSON are read.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image

from .dataset import ImageDataset
from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABELS_FILE = "dataset.json"
_CHUNK = 2048  # images decoded per thread-pool round; bounds the memory held by pending results

_T = TypeVar("_T")


class ImageSource:
    """Read-only access to the files of a folder or .zip archive, named by relative POSIX path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()  # ZipFile reads share one file handle
        self._zip_names: dict[str, str] = {}
        if not self.path.exists():
            raise DataError(f"dataset path {self.path} does not exist; expected a folder or .zip of images")
        if self.path.is_dir():
            names = []
            for root, dirs, files in os.walk(self.path):
                dirs[:] = [d for d in dirs if not _hidden(d)]
                rel = Path(root).relative_to(self.path)
                names += [(rel / f).as_posix() for f in files if not _hidden(f)]
            self.names = sorted(names)
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"dataset path {self.path} is not a folder or a readable .zip archive ({e})") from None
            for info in self._zip.infolist():
                # Archives made on Windows may use backslashes; macOS adds __MACOSX/._* resource forks.
                name = info.filename.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/"):
                    raise DataError(f"{self.path}: member {info.filename!r} points outside the archive (absolute or "
                                    "'..' path); refusing the archive rather than guessing what was meant")
                if info.is_dir() or any(_hidden(part) for part in name.split("/")):
                    continue
                self._zip_names[name] = info.filename
            self.names = sorted(self._zip_names)

    def image_names(self) -> list[str]:
        """Relative paths of the PNG/JPEG files, sorted (the dataset order)."""
        return [n for n in self.names if n.lower().endswith(IMAGE_EXTENSIONS)]

    def where(self, name: str) -> str:
        """How to name a member in an error message: the full path, or 'member in archive.zip'."""
        return f"{name} in {self.path}" if self._zip is not None else str(self.path / name)

    def read(self, name: str) -> bytes:
        try:
            if self._zip is None:
                return (self.path / name).read_bytes()
            with self._lock:
                return self._zip.read(self._zip_names[name])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read {self.where(name)} ({e})") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes fully and normalise the mode to 'L' or 'RGB' (rules in the module docstring)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Image.open is lazy; force the decode so corrupt/truncated files fail here
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {where}: corrupt, truncated or not an image ({e})") from None
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB")
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        lo, _ = img.getchannel("A").getextrema()
        if lo != 255:
            raise DataError(
                f"image {where} has transparent pixels (mode {mode}); flatten it onto a background first"
            )
        return img.convert("L" if mode.startswith("L") else "RGB")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise DataError(f"image {where} has pixel mode {mode}; expected 8-bit greyscale (L) or RGB")


def image_array(img: Image.Image) -> np.ndarray:
    """An L/RGB PIL image as a uint8 [H, W, C] array."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def describe_shape(arr: np.ndarray) -> str:
    h, w, c = arr.shape
    return f"{w}x{h} {'L' if c == 1 else 'RGB'}"


def parallel_map(fn: Callable[[str], _T], names: list[str]) -> Iterator[_T]:
    """fn over names in order, a bounded number at a time on a small thread pool."""
    workers = max(1, min(8, os.cpu_count() or 1))
    if workers == 1 or len(names) < 16:
        yield from map(fn, names)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(names), _CHUNK):
            yield from pool.map(fn, names[i : i + _CHUNK])


def read_labels(src: ImageSource) -> dict[str, int] | None:
    """dataset.json's labels as {relative name: class id}, or None if the file is absent or says null."""
    if LABELS_FILE not in src.names:
        return None
    where = src.where(LABELS_FILE)
    expected = 'expected {"labels": [["relative/name.png", class_id], ...]} or {"labels": null}'
    try:
        meta = json.loads(src.read(LABELS_FILE))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where} is not valid JSON ({e}); {expected}") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"{where} has no 'labels' key; {expected}")
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DataError(f"{where}: 'labels' is a {type(entries).__name__}; {expected}")
    labels: dict[str, int] = {}
    for entry in entries:
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
            and entry[1] >= 0
        )
        if not ok:
            raise DataError(f"{where}: bad label entry {entry!r}; each must be [relative name, class id >= 0]")
        name = entry[0].replace("\\", "/")
        if name in labels:
            raise DataError(f"{where}: {name} is labelled twice")
        labels[name] = entry[1]
    return labels


def _check_labels(labels: dict[str, int], names: list[str], src: ImageSource) -> None:
    where = src.where(LABELS_FILE)
    missing = sorted(set(labels) - set(names))
    if missing:
        raise DataError(
            f"{where} labels {len(missing)} file(s) that are not images in the dataset, e.g. {', '.join(missing[:3])}"
        )
    unlabelled = [n for n in names if n not in labels]
    if unlabelled:
        raise DataError(f"{where} has no label for {len(unlabelled)} image(s), e.g. {', '.join(unlabelled[:3])}")


def load_edm_dataset(path: str | os.PathLike[str], *, use_labels: bool) -> ImageDataset:
    """Load an EDM-layout folder or .zip (module docstring) as an ImageDataset at native resolution."""
    with ImageSource(path) as src:
        names = src.image_names()
        if not names:
            raise DataError(f"dataset path {src.path} contains no PNG/JPEG images")
        # dataset.json is checked even when labels are not used: a labels file that disagrees with the
        # images means the dataset itself is broken, and it is cheaper to learn that now.
        labels = read_labels(src)
        if labels is not None:
            _check_labels(labels, names, src)
        if use_labels and labels is None:
            raise DataError(
                f"data.use_labels is set but {src.path} has no labels ({LABELS_FILE} missing or "
                '{"labels": null})'
            )

        def decode(name: str) -> np.ndarray:
            return image_array(decode_image(src.read(name), src.where(name)))

        out: np.ndarray | None = None
        for i, arr in enumerate(parallel_map(decode, names)):
            if out is None:
                out = np.empty((len(names), *arr.shape), dtype=np.uint8)  # the first image sets the shape
            elif arr.shape != out.shape[1:]:
                first = describe_shape(out[0])
                kind = "sizes" if arr.shape[:2] != out.shape[1:3] else "channel counts"
                raise DataError(
                    f"mixed image {kind}: {src.where(names[0])} is {first} but {src.where(names[i])} is "
                    f"{describe_shape(arr)}; all images must match (convert_images can resize/convert them)"
                )
            out[i] = arr
    assert out is not None
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    if not use_labels or labels is None:
        return ImageDataset(images=images, labels=None, num_classes=0, description=f"EDM images {src.path}")
    lab = torch.tensor([labels[n] for n in names], dtype=torch.int64)
    return ImageDataset(images=images, labels=lab, num_classes=int(lab.max()) + 1, description=f"EDM images {src.path}")
