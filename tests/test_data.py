"""Tests for ectune.data: IDX, Fashion-MNIST, EDM folders/zips, conversion, sampling and device input."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.config import DataConfig
from ectune.data import (
    DataError,
    ImageDataset,
    convert_images,
    global_indices,
    load_batch,
    open_dataset,
    read_idx,
    to_model_input,
    write_idx,
    xflip_mask,
)
from ectune.data import idx as idx_module

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------- helpers
def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def read_member(dest: Path, name: str) -> bytes:
    """A file of an EDM dataset written as either a .zip or a folder."""
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest) as z:
            return z.read(name)
    return (dest / name).read_bytes()


def rand_images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    return arr[..., 0] if c == 1 else arr


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def edm_files(arrs: np.ndarray, labels: list[int] | None, *, with_json: bool = True) -> dict[str, bytes]:
    # Names deliberately not in creation order, to check the dataset is ordered by relative path.
    names = [f"sub{i % 2}/img{i:03d}.png" for i in range(len(arrs))]
    files = {n: png_bytes(a) for n, a in zip(names, arrs)}
    if with_json:
        entries = None if labels is None else [[n, lab] for n, lab in zip(names, labels)]
        files["dataset.json"] = json.dumps({"labels": entries}).encode()
    return files


def sorted_order(n: int) -> list[int]:
    return sorted(range(n), key=lambda i: f"sub{i % 2}/img{i:03d}.png")


def make_idx_dir(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_train).astype(np.uint8)
    write_idx(root / f"train-images-idx3-ubyte{ext}", train)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", labels)
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", train[:n_test])
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", labels[:n_test])
    return train, labels


# ------------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    (tmp_path / "x.gz").rename(tmp_path / "renamed-ubyte")
    np.testing.assert_array_equal(read_idx(tmp_path / "renamed-ubyte"), arr)


def test_idx_truncated_names_file_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t-images-idx3-ubyte truncated.*needs 3152 bytes.*got 3052"):
        read_idx(path)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"t\.gz is a corrupt or truncated gzip"):
        read_idx(path)


def test_idx_bad_header(tmp_path: Path) -> None:
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError, match="magic.*bad magic number"):
        read_idx(tmp_path / "magic")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="code: unknown dtype code 0x07"):
        read_idx(tmp_path / "code")
    (tmp_path / "extra").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06")
    with pytest.raises(DataError, match="extra has trailing data"):
        read_idx(tmp_path / "extra")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("shape, match", [
    ((10, 0, 28), "zero dimension"),
    ((0,), "zero dimension"),
    ((2**32 - 1,) * 3, "declares .* bytes, more than"),  # 8e28 bytes: its int64 product would wrap around
])
def test_idx_absurd_header_refused_before_reading(tmp_path: Path, shape: tuple[int, ...], match: str) -> None:
    path = tmp_path / "forged"
    path.write_bytes(bytes([0, 0, 0x08, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes() + b"\0" * 64)
    with pytest.raises(DataError, match=f"forged: .*{match}"):
        read_idx(path)


def test_idx_gzip_bomb_is_not_expanded(tmp_path: Path) -> None:
    """A 10-byte image file followed by 1 GiB of zeros, gzipped to ~1 MB: refused as trailing data after
    decompressing 11 bytes, not 1 GiB."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    body = [comp.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x05\x06")]
    zeros = bytes(1 << 24)
    body += [comp.compress(zeros) for _ in range(64)]
    path = tmp_path / "bomb.gz"
    path.write_bytes(b"".join(body) + comp.flush())
    assert path.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="bomb.gz has trailing data"):
        read_idx(path)
    assert time.perf_counter() - t0 < 2.0  # expanding 1 GiB takes several seconds on these machines


def test_data_path_must_be_a_file_or_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in [(fifo, "FIFO"), (Path("/dev/zero"), "device")]:
        for source in ("idx", "edm", "fashion-mnist"):
            with pytest.raises(DataError, match=f"--data.path {path} is a {kind}"):
                open_dataset(DataConfig(source=source, path=str(path)))  # returns at once: nothing is read


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_directory_and_file(tmp_path: Path, gz: bool) -> None:
    train, labels = make_idx_dir(tmp_path / "d", gz=gz)
    ds = open_dataset(DataConfig(source="idx", path=str(tmp_path / "d"), use_labels=True))
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), train)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert ds.num_classes == int(labels.max()) + 1
    test = open_dataset(DataConfig(source="idx", path=str(tmp_path / "d"), split="test"))
    assert len(test) == 5 and test.labels is None and test.num_classes == 0
    # A direct path to the images file finds the labels beside it.
    ext = ".gz" if gz else ""
    direct = open_dataset(
        DataConfig(source="idx", path=str(tmp_path / "d" / f"train-images-idx3-ubyte{ext}"), use_labels=True)
    )
    assert torch.equal(direct.labels, ds.labels)


def test_idx_labels_requested_but_absent(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"use_labels.*train-images-idx3-ubyte"):
        open_dataset(DataConfig(source="idx", path=str(tmp_path), use_labels=True))
    assert open_dataset(DataConfig(source="idx", path=str(tmp_path))).labels is None


def test_idx_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing.*does not exist"):
        open_dataset(DataConfig(source="idx", path=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        open_dataset(DataConfig(source="idx", path=str(tmp_path)))


# -------------------------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fashion_train() -> ImageDataset:
    if not DEBIAN_FASHION.is_dir():
        pytest.skip(f"{DEBIAN_FASHION} does not exist (install it with `apt-get install dataset-fashion-mnist`)")
    return open_dataset(DataConfig(source="fashion-mnist", path=str(DEBIAN_FASHION), use_labels=True))


def test_fashion_mnist_debian(fashion_train: ImageDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = fashion_train
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous() and ds.channels == 1 and ds.resolution == 28
    assert ds.num_classes == 10 and sorted(ds.labels.unique().tolist()) == list(range(10))
    # The default search (no path) finds the Debian location too.
    monkeypatch.delenv("ECTUNE_FASHION_MNIST", raising=False)
    test = open_dataset(DataConfig(source="fashion-mnist", split="test"))
    assert test.images.shape == (10000, 1, 28, 28) and test.labels is None


def test_fashion_mnist_padding_is_centred(fashion_train: ImageDataset) -> None:
    padded = open_dataset(DataConfig(source="fashion-mnist", path=str(DEBIAN_FASHION), resolution=32))
    assert padded.images.shape == (60000, 1, 32, 32) and padded.resolution == 32
    assert torch.equal(padded.images[:, :, 2:30, 2:30], fashion_train.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.count_nonzero()) == 0


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECTUNE_FASHION_MNIST", str(tmp_path / "empty"))
    monkeypatch.setattr(idx_module, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*--data\.path"):
        open_dataset(DataConfig(source="fashion-mnist"))


def test_resolution_smaller_than_native(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    with pytest.raises(DataError, match=r"data\.resolution=16 is smaller than the native 28x28"):
        open_dataset(DataConfig(source="idx", path=str(tmp_path), resolution=16))


def test_odd_padding(tmp_path: Path) -> None:
    train, _ = make_idx_dir(tmp_path)
    ds = open_dataset(DataConfig(source="idx", path=str(tmp_path), resolution=31))
    assert torch.equal(ds.images[:, 0, 1:29, 1:29], torch.from_numpy(train))


# ------------------------------------------------------------------------------------------------- EDM
@pytest.mark.parametrize("container", ["zip", "folder"])
@pytest.mark.parametrize("labelled", [True, False])
def test_edm_dataset(tmp_path: Path, container: str, labelled: bool) -> None:
    arrs = rand_images(6, 8, 8, 3)
    labels = [3, 1, 4, 1, 5, 0]
    files = edm_files(arrs, labels if labelled else None)
    path = write_zip(tmp_path / "d.zip", files) if container == "zip" else write_folder(tmp_path / "d", files)
    ds = open_dataset(DataConfig(source="edm", path=str(path), use_labels=labelled))
    order = sorted_order(6)
    assert ds.images.shape == (6, 3, 8, 8) and ds.channels == 3 and ds.resolution == 8
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs[order])
    if labelled:
        assert ds.labels.tolist() == [labels[i] for i in order] and ds.num_classes == 6
    else:
        assert ds.labels is None and ds.num_classes == 0
        with pytest.raises(DataError, match=r"use_labels is set but .*d(\.zip)? has no labels"):
            open_dataset(DataConfig(source="edm", path=str(path), use_labels=True))


def test_edm_without_json_greyscale_and_padding(tmp_path: Path) -> None:
    arrs = rand_images(3, 5, 5, 1)
    path = write_folder(tmp_path / "g", edm_files(arrs, None, with_json=False))
    ds = open_dataset(DataConfig(source="edm", path=str(path), resolution=8))
    assert ds.images.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(ds.images[:, 0, 1:6, 1:6].numpy(), arrs[sorted_order(3)])
    with pytest.raises(DataError, match="use_labels is set"):
        open_dataset(DataConfig(source="edm", path=str(path), use_labels=True))


def test_edm_modes(tmp_path: Path) -> None:
    rgb = rand_images(1, 4, 4, 3)[0]
    opaque = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    pal = Image.fromarray(rgb).convert("P")
    pal_buf = io.BytesIO()
    pal.save(pal_buf, format="PNG")
    files = {"a.png": png_bytes(opaque), "b.jpg": jpeg_bytes(rgb), "c.png": pal_buf.getvalue()}
    ds = open_dataset(DataConfig(source="edm", path=str(write_folder(tmp_path / "m", files))))
    assert ds.images.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), rgb)  # opaque alpha dropped
    transparent = opaque.copy()
    transparent[0, 0, 3] = 10
    write_folder(tmp_path / "t", {"x.png": png_bytes(transparent)})
    with pytest.raises(DataError, match=r"x\.png has transparent pixels"):
        open_dataset(DataConfig(source="edm", path=str(tmp_path / "t")))


def test_edm_corrupt_png_in_zip_named(tmp_path: Path) -> None:
    good = png_bytes(rand_images(1, 8, 8, 3)[0])
    path = write_zip(tmp_path / "c.zip", {"a/ok.png": good, "b/bad.png": b"\x89PNG\r\n\x1a\nnot really"})
    with pytest.raises(DataError, match=r"cannot decode image b/bad\.png in .*c\.zip"):
        open_dataset(DataConfig(source="edm", path=str(path)))
    path = write_zip(tmp_path / "t.zip", {"a/ok.png": good, "b/cut.png": good[: len(good) // 2]})
    with pytest.raises(DataError, match=r"b/cut\.png in .*t\.zip"):
        open_dataset(DataConfig(source="edm", path=str(path)))


def test_edm_thread_pool_order_and_error(tmp_path: Path) -> None:
    # Enough images for the thread-pool path; order must still follow the sorted names.
    arrs = rand_images(40, 4, 4, 3)
    files = {f"{i:02d}.png": png_bytes(a) for i, a in enumerate(arrs)}
    ds = open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "p.zip", files))))
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs)
    files["17.png"] = b"garbage"
    with pytest.raises(DataError, match=r"cannot decode image 17\.png in .*q\.zip"):
        open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "q.zip", files))))


def test_edm_mixed_sizes_and_channels(tmp_path: Path) -> None:
    files = {"a.png": png_bytes(rand_images(1, 8, 8, 3)[0]), "b.png": png_bytes(rand_images(1, 6, 6, 3)[0])}
    with pytest.raises(DataError, match=r"mixed image sizes: .*a\.png is 8x8 RGB but .*b\.png is 6x6 RGB"):
        open_dataset(DataConfig(source="edm", path=str(write_folder(tmp_path / "s", files))))
    files = {"a.png": png_bytes(rand_images(1, 8, 8, 3)[0]), "b.png": png_bytes(rand_images(1, 8, 8, 1)[0])}
    msg = r"mixed image channel counts: a\.png in .*c\.zip is 8x8 RGB but b\.png in .*c\.zip is 8x8 L"
    with pytest.raises(DataError, match=msg):
        open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "c.zip", files))))


def test_edm_empty_missing_and_bad_labels(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty contains no PNG/JPEG images"):
        open_dataset(DataConfig(source="edm", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match=r"missing\.zip does not exist"):
        open_dataset(DataConfig(source="edm", path=str(tmp_path / "missing.zip")))
    with pytest.raises(DataError, match=r"data\.path"):
        open_dataset(DataConfig(source="edm"))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.zip is not a folder or a readable \.zip"):
        open_dataset(DataConfig(source="edm", path=str(tmp_path / "junk.zip")))

    files = edm_files(rand_images(2, 4, 4, 3), [0, 1])
    files["dataset.json"] = json.dumps(
        {"labels": [["sub0/img000.png", 0], ["sub1/img001.png", 1], ["gone.png", 2]]}
    ).encode()
    with pytest.raises(DataError, match=r"dataset\.json in .*l\.zip labels 1 file.*gone\.png"):
        open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "l.zip", files)), use_labels=True))
    files["dataset.json"] = json.dumps({"labels": [["sub0/img000.png", 0]]}).encode()
    with pytest.raises(DataError, match=r"no label for 1 image.*sub1/img001\.png"):
        open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "u.zip", files)), use_labels=True))
    files["dataset.json"] = b'{"labels": [["sub0/img000.png", "cat"]]}'
    with pytest.raises(DataError, match=r"bad label entry"):
        open_dataset(DataConfig(source="edm", path=str(write_zip(tmp_path / "b.zip", files)), use_labels=True))


# ---------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("dest_name", ["out.zip", "out"])
def test_convert_labelled_tree(tmp_path: Path, dest_name: str) -> None:
    src = tmp_path / "src"
    # Class folders sorted: cat=0, dog=1, emu=2. Mixed sizes/aspect ratios are resized to 8x8.
    write_folder(src, {
        "dog/1.png": png_bytes(rand_images(1, 10, 14, 3, seed=1)[0]),
        "cat/a.jpg": jpeg_bytes(rand_images(1, 16, 16, 3)[0]),
        "cat/b.png": png_bytes(rand_images(1, 12, 12, 1, seed=2)[0]),
        "emu/x/deep.png": png_bytes(rand_images(1, 9, 9, 3, seed=3)[0]),
    })
    dest = tmp_path / dest_name
    assert convert_images(src, dest, resolution=8, channels=3) == 4
    meta = json.loads(read_member(dest, "dataset.json"))
    assert meta["labels"] == [
        ["00000/img00000000.png", 0], ["00000/img00000001.png", 0],
        ["00000/img00000002.png", 1], ["00000/img00000003.png", 2],
    ]
    ds = open_dataset(DataConfig(source="edm", path=str(dest), use_labels=True))
    assert ds.images.shape == (4, 3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 2] and ds.num_classes == 3


def test_convert_unlabelled_and_errors(tmp_path: Path) -> None:
    arrs = rand_images(3, 6, 6, 1)
    src = write_folder(tmp_path / "flat", {f"{i}.png": png_bytes(a) for i, a in enumerate(arrs)})
    assert convert_images(src, tmp_path / "flat.zip") == 3
    with zipfile.ZipFile(tmp_path / "flat.zip") as z:
        assert json.loads(z.read("dataset.json")) == {"labels": None}
    ds = open_dataset(DataConfig(source="edm", path=str(tmp_path / "flat.zip")))
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), arrs)
    with pytest.raises(DataError, match="already exists"):
        convert_images(src, tmp_path / "flat.zip")

    write_folder(tmp_path / "mixed", {"a.png": png_bytes(arrs[0]), "b.png": png_bytes(rand_images(1, 7, 7, 1)[0])})
    with pytest.raises(DataError, match=r"mixed image sizes.*a\.png is 6x6 L but .*b\.png is 7x7 L; pass resolution="):
        convert_images(tmp_path / "mixed", tmp_path / "m.zip")
    assert not (tmp_path / "m.zip").exists() and not (tmp_path / "m.zip.partial").exists()
    write_folder(tmp_path / "half", {"top.png": png_bytes(arrs[0]), "cls/in.png": png_bytes(arrs[1])})
    with pytest.raises(DataError, match=r"mixes top-level images \(top\.png\)"):
        convert_images(tmp_path / "half", tmp_path / "h")
    with pytest.raises(DataError, match="channels=2"):
        convert_images(src, tmp_path / "x", channels=2)


# ---------------------------------------------------------------------------------------------- torchvision
def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(DataError, match=r"pip install torchvision.*matching"):
        open_dataset(DataConfig(source="torchvision", name="CIFAR10"))
    with pytest.raises(DataError, match=r"data\.name='Nope'.*CIFAR10"):
        open_dataset(DataConfig(source="torchvision", name="Nope"))


def test_torchvision_layouts_with_fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hwc = rand_images(4, 6, 6, 3)

    class CIFAR10:
        classes = [str(i) for i in range(10)]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.data, self.targets = hwc, [1, 2, 3, 9]

    class MNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            if not train:
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            self.data = torch.from_numpy(rand_images(2, 5, 5, 1))
            self.targets = torch.tensor([0, 7])

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=CIFAR10, MNIST=MNIST)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    ds = open_dataset(DataConfig(source="torchvision", name="CIFAR10", path=str(tmp_path), use_labels=True))
    assert ds.images.shape == (4, 3, 6, 6) and ds.num_classes == 10 and ds.labels.tolist() == [1, 2, 3, 9]
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), hwc)
    mn = open_dataset(DataConfig(source="torchvision", name="MNIST", path=str(tmp_path), resolution=8))
    assert mn.images.shape == (2, 1, 8, 8) and mn.labels is None
    with pytest.raises(DataError, match=r"MNIST \(test\).*--data\.download"):
        open_dataset(DataConfig(source="torchvision", name="MNIST", path=str(tmp_path), split="test"))


# ---------------------------------------------------------------------------------------------- sampling
def test_stream_is_split_invariant() -> None:
    n, b = 10, 7
    whole = global_indices(n, seed=3, start=0, count=2 * b)
    parts = torch.cat([global_indices(n, seed=3, start=0, count=b), global_indices(n, seed=3, start=b, count=b)])
    assert whole.dtype == torch.int64 and torch.equal(whole, parts)
    # Any split point of a long stretch agrees with the one-shot call.
    long = global_indices(n, seed=3, start=5, count=40)
    assert torch.equal(long, torch.cat([global_indices(n, seed=3, start=5 + i, count=1) for i in range(40)]))
    assert global_indices(n, seed=3, start=4, count=0).numel() == 0


def test_every_epoch_is_a_permutation() -> None:
    n = 13
    stream = global_indices(n, seed=0, start=0, count=5 * n)
    epochs = stream.view(5, n)
    for e in range(5):
        assert sorted(epochs[e].tolist()) == list(range(n))
    assert len({tuple(row.tolist()) for row in epochs}) > 1  # epochs are reshuffled
    assert not torch.equal(stream, global_indices(n, seed=1, start=0, count=5 * n))  # the seed matters


def test_global_indices_needs_items() -> None:
    with pytest.raises(DataError, match="n_items=0"):
        global_indices(0, seed=0, start=0, count=1)


def test_xflip_mask_per_sample() -> None:
    pos = torch.arange(1000, 1064)
    mask = xflip_mask(pos, seed=5)
    assert mask.dtype == torch.bool and 10 < int(mask.sum()) < 54
    assert torch.equal(mask[17:20], xflip_mask(pos[17:20], seed=5))  # independent of the batch it sits in
    assert not torch.equal(mask, xflip_mask(pos, seed=6))


# ------------------------------------------------------------------------------------------ device input
def test_to_model_input_range_and_flip() -> None:
    u8 = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3) * 20
    u8[0, 0, 0, 0], u8[1, 0, 1, 2] = 0, 255
    x = to_model_input(u8, device="cpu")
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    torch.testing.assert_close(x, u8.float() / 127.5 - 1)
    flipped = to_model_input(u8, device="cpu", xflip=True, flip_mask=torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    # flip_mask is ignored without xflip; a generator gives reproducible random flips.
    assert torch.equal(to_model_input(u8, device="cpu", flip_mask=torch.tensor([True, True])), x)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = to_model_input(u8, device="cpu", xflip=True, generator=g1)
    assert torch.equal(a, to_model_input(u8, device="cpu", xflip=True, generator=g2))
    with pytest.raises(DataError, match="uint8"):
        to_model_input(u8.double(), device="cpu")
    latents = torch.randn(2, 4, 2, 3)  # float32 latents pass unchanged (they are already in the model's scale)
    assert torch.equal(to_model_input(latents, device="cpu"), latents)


def test_load_batch_and_dataset_checks() -> None:
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    ds = ImageDataset(images=images, labels=torch.tensor([0, 1, 2, 1, 0]), num_classes=3, description="toy")
    u8, lab = load_batch(ds, torch.tensor([4, 0, 4]))
    assert torch.equal(u8, images[[4, 0, 4]]) and lab.tolist() == [0, 0, 0]
    assert len(ds) == 5 and ds.channels == 1 and ds.resolution == 2 and "5 x 1x2x2" in repr(ds)
    with pytest.raises(DataError, match="toy has 5 images"):
        load_batch(ds, torch.tensor([5]))
    with pytest.raises(DataError, match="num_classes is 2"):
        ImageDataset(images=images, labels=torch.tensor([0, 1, 2, 1, 0]), num_classes=2, description="toy")
    wide = ImageDataset(images=torch.zeros(1, 1, 2, 3, dtype=torch.uint8), labels=None, num_classes=0, description="w")
    with pytest.raises(DataError, match="2x3, expected square"):
        _ = wide.resolution


@pytest.mark.parametrize("member", ["../evil.png", "a/../../evil.png", "/abs/evil.png"])
def test_zip_member_outside_the_archive_is_reported(tmp_path: Path, member: str) -> None:
    img = png_bytes(rand_images(1, 6, 6, 1)[0])
    path = write_zip(tmp_path / "d.zip", {"ok.png": img, member: img})
    with pytest.raises(DataError, match=rf"d\.zip: member '{re.escape(member)}' points outside the archive"):
        open_dataset(DataConfig(source="edm", path=str(path)))


def test_convert_resolution_has_an_upper_bound(tmp_path: Path) -> None:
    src = write_folder(tmp_path / "s", {"a.png": png_bytes(rand_images(1, 6, 6, 1)[0])})
    for bad in (0, 4097, 40_000):
        with pytest.raises(DataError, match=rf"resolution={bad}, expected an integer in \[1, 4096\]"):
            convert_images(src, tmp_path / "out.zip", resolution=bad)
    assert not (tmp_path / "out.zip").exists()
