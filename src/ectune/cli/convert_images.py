"""`ectune convert-images`: a folder of images (first-level subfolders = class labels) to EDM's dataset layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from .common import optional, parse


@dataclass(frozen=True, kw_only=True)
class ConvertImagesArgs:
    """convert a folder of images (class subfolders optional) to EDM's dataset layout"""

    src: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")]
    """folder (or .zip) of images; its first-level subfolders, if any, are the classes"""
    dest: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="DEST")]
    """DEST.zip or a directory"""
    resolution: Annotated[int | None, optional("R", unset="keep the size, which all images must share")] = None
    """centre-crop and resize to this size"""
    channels: Annotated[Literal[1, 3] | None, optional("{1,3}", unset="keep the channels, which all must share")] = None
    """1 (greyscale) or 3 (RGB)"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(ConvertImagesArgs, command, argv)
    from ..data import convert_images

    n = convert_images(a.src, a.dest, resolution=a.resolution, channels=a.channels)
    print(f"wrote {n} images to {a.dest}")
    return 0
