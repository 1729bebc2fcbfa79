"""Convert a folder (or .zip) of images into the EDM dataset layout read by `load_edm_dataset`."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

from PIL import Image

from .edm import LABELS_FILE, ImageSource, decode_image, parallel_map
from .errors import DataError


MAX_RESOLUTION = 4096  # one 4096² RGB image is 48 MB as uint8; larger sizes are a typo, not a dataset


def _class_labels(names: list[str], src: Path) -> list[int] | None:
    """Class ids from the first-level subfolder names (sorted, index = id); None when all images are top-level."""
    folders = [n.split("/", 1)[0] if "/" in n else None for n in names]
    if all(f is None for f in folders):
        return None
    if any(f is None for f in folders):
        top = next(n for n, f in zip(names, folders) if f is None)
        nested = next(n for n, f in zip(names, folders) if f is not None)
        raise DataError(
            f"{src} mixes top-level images ({top}) with images in class subfolders ({nested}); "
            "put every image in a class folder (labelled) or none (unlabelled)"
        )
    classes = sorted(set(f for f in folders if f is not None))
    index = {c: i for i, c in enumerate(classes)}
    return [index[f] for f in folders if f is not None]


def _prepare(img: Image.Image, *, resolution: int | None, channels: int | None) -> Image.Image:
    """Channel conversion, then a centre crop to a square and a Lanczos resize when a resolution is given."""
    if channels is not None:
        img = img.convert("L" if channels == 1 else "RGB")
    if resolution is not None:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if s != resolution:
            # Lanczos: sharp and alias-free when downsampling, the usual choice for dataset preparation.
            img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def _archive_name(i: int) -> str:
    # dataset_tool's naming: 1000 images per folder keeps directory listings small.
    idx = f"{i:08d}"
    return f"{idx[:5]}/img{idx}.png"


def convert_images(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    resolution: int | None = None,
    channels: int | None = None,
) -> int:
    """Convert the PNG/JPEG images under `src` (a folder or .zip) into an EDM dataset at `dest`.

    Args:
        src: folder (or .zip) of images. If the images sit in first-level subfolders, those folder names
            are the classes (sorted; the index is the class id), e.g. src/cat/1.png -> class 0, src/dog/... -> 1.
            If all images are at the top level the dataset is unlabelled ({"labels": null}).
        dest: output; a .zip archive if the name ends with '.zip', else a folder. Must not exist yet
            (an empty folder is accepted). Written under a temporary name and renamed at the end, so a
            failed conversion leaves nothing half-written behind.
        resolution: if given, centre-crop each image to a square and resize it to resolution x resolution
            (Lanczos). If None, all images must already have the same size.
        channels: 1 (greyscale) or 3 (RGB) to convert every image; None keeps the source channels, which
            must then agree.

    Returns:
        The number of images written.
    """
    src, dest = Path(src), Path(dest)
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 1 <= resolution <= MAX_RESOLUTION):
        raise DataError(f"convert_images: resolution={resolution!r}, expected an integer in [1, {MAX_RESOLUTION}] "
                        "or None")
    if channels not in (None, 1, 3):
        raise DataError(f"convert_images: channels={channels!r}, expected 1, 3 or None")
    if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
        raise DataError(f"convert_images: destination {dest} already exists; remove it or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    as_zip = dest.name.lower().endswith(".zip")
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    with ImageSource(src) as source:
        names = source.image_names()
        if not names:
            raise DataError(f"convert_images: {src} contains no PNG/JPEG images")
        labels = _class_labels(names, src)

        def encode(name: str) -> tuple[tuple[int, int], str, bytes]:
            img = decode_image(source.read(name), source.where(name))
            img = _prepare(img, resolution=resolution, channels=channels)
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=6)
            return img.size, img.mode, buf.getvalue()

        archive = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) if as_zip else None
        try:
            first: tuple[tuple[int, int], str] | None = None
            for i, (size, mode, png) in enumerate(parallel_map(encode, names)):
                if first is None:
                    first = (size, mode)
                elif (size, mode) != first:
                    kind = "sizes" if size != first[0] else "channel counts"
                    hint = "pass resolution=" if kind == "sizes" else "pass channels="
                    raise DataError(
                        f"convert_images: mixed image {kind}: {source.where(names[0])} is "
                        f"{first[0][0]}x{first[0][1]} {first[1]} but {source.where(names[i])} is "
                        f"{size[0]}x{size[1]} {mode}; {hint} to make them agree"
                    )
                _write(archive, tmp, _archive_name(i), data=png)  # PNG is already compressed: store it
            entries = None if labels is None else [[_archive_name(i), lab] for i, lab in enumerate(labels)]
            _write(archive, tmp, LABELS_FILE, data=json.dumps({"labels": entries}).encode())
        except BaseException:
            if archive is not None:
                archive.close()
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise
        if archive is not None:
            archive.close()
    if dest.is_dir():
        dest.rmdir()  # empty (checked above); os.replace cannot replace a directory
    os.replace(tmp, dest)
    return len(names)


def _write(archive: zipfile.ZipFile | None, root: Path, name: str, *, data: bytes) -> None:
    if archive is not None:
        archive.writestr(name, data)
        return
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
