"""IDX files (the MNIST / Fashion-MNIST format): reader, writer and the dataset loaders built on them.

Layout (big-endian): two zero bytes, a dtype code, the number of dimensions D, then D uint32 sizes and the
data in C order. Files may be gzip-compressed; compression is detected from the gzip magic bytes (1f 8b),
not from the file name, so a renamed file still loads.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .errors import DataError

# IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# The largest IDX content read (ImageNet-64 as uint8 is 15 GB): a header declaring more is corrupt or hostile.
_MAX_IDX_BYTES = 1 << 36

FASHION_MNIST_DIRS_ENV = "ECTUNE_FASHION_MNIST"
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _gunzip_at_most(raw: bytes, limit: int) -> bytes:
    """The first `limit` decompressed bytes of a gzip stream (fewer if it ends): a decompression bomb is never
    expanded past what the caller can use."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out, pending = bytearray(), raw
    while len(out) < limit:
        chunk = d.decompress(pending, limit - len(out))
        out += chunk
        pending = d.unconsumed_tail
        if not chunk and not pending:
            if not d.eof:
                raise zlib.error("the compressed stream ends early")
            break
    return bytes(out)


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """The file's raw content, and whether it is gzip (detected by magic bytes)."""
    if not path.exists():
        raise DataError(f"IDX file {path} does not exist")
    if not path.is_file():
        raise DataError(f"IDX file {path} is not a regular file")
    raw = path.read_bytes()
    return raw, raw[:2] == _GZIP_MAGIC


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian numpy array of its stored shape and dtype.

    Raises DataError naming the file if the magic number, dtype code or dimensions are invalid (a zero
    dimension, or a size no machine holds), or if the file length differs from what the header promises (a
    truncated download is the usual cause). A gzip file is decompressed only as far as the header says.
    """
    path = Path(path)
    raw, gz = _read_bytes(path)

    def content(limit: int) -> bytes:
        if not gz:
            return raw[:limit]
        try:
            return _gunzip_at_most(raw, limit)
        except zlib.error as e:
            raise DataError(f"IDX file {path} is a corrupt or truncated gzip file ({e})") from None

    data = content(4)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"IDX file {path}: bad magic number {data[:4].hex() or '(empty file)'}, expected 0000xxxx")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(
            f"IDX file {path}: unknown dtype code 0x{code:02x}, expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    if ndim == 0:
        raise DataError(f"IDX file {path}: has 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    data = content(header)
    if len(data) < header:
        raise DataError(f"IDX file {path}: truncated header, expected {header} bytes, got {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if 0 in shape:
        raise DataError(f"IDX file {path}: shape {shape} has a zero dimension, expected every dimension >= 1")
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if expected > _MAX_IDX_BYTES:
        raise DataError(f"IDX file {path}: shape {shape} of {dtype.name} declares {expected:,} bytes, more than "
                        f"{_MAX_IDX_BYTES:,} (a corrupt header)")
    data = content(expected + 1)  # one byte more tells trailing data apart
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing data"
        raise DataError(
            f"IDX file {path} {what}: shape {shape} of {dtype.name} needs {expected} bytes "
            f"(after decompression), got {len(data) if len(data) <= expected else 'more'}"
        )
    # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
    arr = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return arr.reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as an IDX file; gzip-compressed when the path ends with '.gz'.

    Supported dtypes: uint8, int8, int16, int32, float32, float64. The gzip header carries no timestamp so
    the same array always gives the same bytes.
    """
    path = Path(path)
    array = np.asarray(array)
    code = next((c for c, dt in _IDX_DTYPES.items() if dt.newbyteorder("=") == array.dtype), None)
    if code is None:
        raise DataError(
            f"write_idx({path}): dtype {array.dtype} has no IDX code; use uint8/int8/int16/int32/float32/float64"
        )
    if array.ndim == 0 or array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise DataError(f"write_idx({path}): shape {array.shape} cannot be stored in IDX")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def _images_to_tensor(arr: np.ndarray, path: Path) -> torch.Tensor:
    """IDX image array -> uint8 [N, C, H, W]: 3-D means [N, H, W] greyscale, 4-D means [N, H, W, C]."""
    if arr.dtype != np.uint8:
        raise DataError(f"IDX images {path}: dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"IDX images {path}: shape {arr.shape}, expected [N, H, W] or [N, H, W, C] with C = 1 or 3")
    if arr.shape[0] == 0:
        raise DataError(f"IDX images {path}: holds 0 images")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _labels_to_tensor(arr: np.ndarray, path: Path, n: int) -> torch.Tensor:
    if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iu":
        raise DataError(f"IDX labels {path}: {arr.dtype} {arr.shape}, expected {n} integer labels to match the images")
    if n and int(arr.min()) < 0:
        raise DataError(f"IDX labels {path}: negative label {int(arr.min())}, expected class ids >= 0")
    return torch.from_numpy(arr.astype(np.int64))


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _name_variants(prefix: str, kind: str) -> list[str]:
    """Standard file names, e.g. train-images-idx3-ubyte(.gz); some mirrors use '.idx3' instead of '-idx3'."""
    stem = "images" if kind == "images" else "labels"
    dims = "idx3" if kind == "images" else "idx1"
    names = [f"{prefix}-{stem}-{dims}-ubyte", f"{prefix}-{stem}.{dims}-ubyte"]
    return [n + ext for n in names for ext in ("", ".gz")]


def find_idx_files(path: str | os.PathLike[str], *, split: str) -> tuple[Path, Path | None]:
    """Locate (images, labels-or-None) for `split` from a directory or a direct images-file path."""
    path = Path(path)
    if path.is_dir():
        prefix = "t10k" if split == "test" else "train"
        images = _first_existing([path / n for n in _name_variants(prefix, "images")])
        if images is None:
            raise DataError(
                f"IDX directory {path} has no {prefix}-images-idx3-ubyte[.gz] (split {split!r}); "
                "expected the standard MNIST file names"
            )
        labels = _first_existing([path / n for n in _name_variants(prefix, "labels")])
        return images, labels
    if path.is_file():
        # The labels file sits beside the images under the standard naming.
        name = path.name
        for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
            if a in name:
                base = name.replace(a, b).removesuffix(".gz")
                return path, _first_existing([path.with_name(base), path.with_name(base + ".gz")])
        return path, None
    raise DataError(f"IDX path {path} does not exist; expected a directory of MNIST-format files or an images file")


def load_idx_dataset(
    path: str | os.PathLike[str], *, split: str, use_labels: bool, num_classes: int | None = None, name: str = "IDX"
) -> ImageDataset:
    """Load an MNIST-format dataset (see `find_idx_files`) as an ImageDataset at native resolution.

    `num_classes` fixes the class count (10 for Fashion-MNIST); None infers max(label) + 1.
    """
    images_path, labels_path = find_idx_files(path, split=split)
    images = _images_to_tensor(read_idx(images_path), images_path)
    labels = None
    n_cls = 0
    if use_labels:
        if labels_path is None:
            raise DataError(
                f"data.use_labels is set but no labels file was found beside {images_path} "
                "(expected e.g. train-labels-idx1-ubyte[.gz])"
            )
        labels = _labels_to_tensor(read_idx(labels_path), labels_path, images.shape[0])
        n_cls = int(labels.max()) + 1 if num_classes is None else num_classes
        if int(labels.max()) >= n_cls:
            raise DataError(f"IDX labels {labels_path}: label {int(labels.max())} >= num_classes {n_cls}")
    return ImageDataset(images=images, labels=labels, num_classes=n_cls, description=f"{name} {split} {images_path}")


def fashion_mnist_dirs() -> list[Path]:
    """Default Fashion-MNIST locations, searched in order: $ECTUNE_FASHION_MNIST, then the Debian package's."""
    dirs = []
    env = os.environ.get(FASHION_MNIST_DIRS_ENV, "")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(FASHION_MNIST_DEBIAN_DIR))
    return dirs


def load_fashion_mnist(path: str, *, split: str, use_labels: bool) -> ImageDataset:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes) from `path` or the default locations."""
    if path:
        return load_idx_dataset(path, split=split, use_labels=use_labels, num_classes=10, name="Fashion-MNIST")
    prefix = "t10k" if split == "test" else "train"
    searched = fashion_mnist_dirs()
    for d in searched:
        if d.is_dir() and _first_existing([d / n for n in _name_variants(prefix, "images")]) is not None:
            return load_idx_dataset(d, split=split, use_labels=use_labels, num_classes=10, name="Fashion-MNIST")
    raise DataError(
        f"Fashion-MNIST {split} files not found in {', '.join(str(d) for d in searched)}; "
        "install them with `apt-get install dataset-fashion-mnist`, set $ECTUNE_FASHION_MNIST, "
        "or pass --data.path DIR"
    )
