"""Shared test helpers: a small net for maths tests, tiny training configs on real Fashion-MNIST, and fakes of
EDM's code base for the pickle importer. Test modules import helpers from here, never from each other."""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from ectune.config import NetConfig, RunConfig
from ectune.data.idx import fashion_mnist_dirs
from ectune.nets import SMALL_CONFIGS, build_net
from ectune.nets.dropout import KeyedDropout, assign_dropout_salts
from ectune.presets import get_preset


class TinyNet(nn.Module):
    """A small conv net with the ectune net signature and keyed dropout, for maths tests independent of nets/."""

    def __init__(self, channels: int = 1, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(1, width)
        self.drop = KeyedDropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.calls: list[tuple[int, bool]] = []  # (rows, grad enabled) per call
        assign_dropout_salts(self)

    def forward(self, x, c_noise, class_labels=None, *, dropout_key=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        h = torch.relu(self.inp(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None])
        return self.out(self.drop(h, dropout_key))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: on a 2-core machine shared with other work, 2 OpenMP threads can thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A tiny untrained consistency model file (any command accepts it)."""
    from ectune.runtime.checkpoint import save_model

    cfg = replace(RunConfig(), net=SMALL_CONFIGS["tiny"])
    path = tmp_path / "m.safetensors"
    save_model(path, build_net(cfg.net).state_dict(), cfg, extra={"objective": "ect"})
    return path


# ---------------------------------------------------------------------------------------------- tiny training runs

HAVE_FMNIST = any((d / "t10k-images-idx3-ubyte.gz").exists() for d in fashion_mnist_dirs())
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

TINY = ["--net.model-channels", "16", "--net.channel-mult", "1", "2", "--net.num-blocks", "1",
        "--net.attn-resolutions", "8", "--net.img-resolution", "32", "--data.resolution", "32", "--data.split", "test"]


def tiny(mode="pretrain", objective="ect", **train_kw):
    cfg = get_preset("fashion-mnist", mode, objective=objective)
    net = replace(SMALL_CONFIGS["tiny"], model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                  dropout=cfg.net.dropout)
    cfg = replace(cfg, net=net, data=replace(cfg.data, split="test", resolution=32))
    return with_fields(cfg, **{**dict(total_kimg=0.128, batch=16, status_kimg=0.032, save_kimg=0.064, sample_kimg=0.0),
                               **train_kw})


def with_fields(cfg, **fields):
    """cfg with each field set in the train or runtime section that has it."""
    runtime_names = {f.name for f in dataclasses.fields(cfg.runtime)}
    train = {k: v for k, v in fields.items() if k not in runtime_names}
    runtime = {k: v for k, v in fields.items() if k in runtime_names}
    return replace(cfg, train=replace(cfg.train, **train), runtime=replace(cfg.runtime, **runtime))


# ---------------------------------------------------------------------------------------------- EDM pickle fakes

FAKE_MODULES = {
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": textwrap.dedent('''
        def _reconstruct_persistent_obj(meta):
            raise RuntimeError("the real persistence reconstructor must never run during a safe load")

        class Persistent:
            """Pickles exactly like an instance of an EDM @persistent_class."""
            def __init__(self, class_name, state, module_src):
                self.class_name, self.state, self.module_src = class_name, state, module_src
            def __reduce__(self):
                meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name,
                            state=self.state)
                return (_reconstruct_persistent_obj, (meta,))
    '''),
    "dnnlib/__init__.py": "from .util import EasyDict\n",
    "dnnlib/util.py": "class EasyDict(dict):\n    pass\n",
    # ECT's loss object holds a bound method of itself: fabricated as a persistent object and as a plain class.
    "training/__init__.py": "",
    "training/loss.py": textwrap.dedent('''
        from torch_utils.persistence import Persistent

        class _Mapping:
            def t_to_r(self, t):
                raise RuntimeError("a pickled bound method must never be called during a safe load")

        class PersistentLoss(_Mapping, Persistent):
            """A persistent loss: pickles through _reconstruct_persistent_obj, its state holding self.t_to_r."""
            def __init__(self, module_src):
                super().__init__("ECTLoss", dict(P_mean=-1.1, P_std=2.0, sigma_data=0.5), module_src)
                self.state["mapping_fn"] = self.t_to_r

        class PlainLoss(_Mapping):
            """A plain class: pickles as NEWOBJ(training.loss.PlainLoss) + BUILD of a __dict__ holding self.t_to_r."""
            def __init__(self, module_src):
                self.P_mean, self.mapping_fn = -1.1, self.t_to_r
    '''),
}
FAKE_MODULE_NAMES = ("torch_utils.persistence", "torch_utils", "dnnlib.util", "dnnlib", "training.loss", "training")


@pytest.fixture
def fake_edm(tmp_path: Path) -> Iterator[Any]:
    """Importable fake EDM support modules for writing pickles; unimportable again once the test loads."""
    root = tmp_path / "fake_edm_code"
    for rel, src in FAKE_MODULES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src)
    sys.path.insert(0, str(root))
    try:
        import dnnlib  # noqa: F401
        import torch_utils.persistence as persistence

        yield persistence
    finally:
        sys.path.remove(str(root))
        for name in FAKE_MODULE_NAMES:
            sys.modules.pop(name, None)


def as_persistent(module: nn.Module, persistence: Any, module_src: str) -> Any:
    """Rebuild an nn.Module tree as EDM pickles it: persistent objects, except torch.nn containers."""
    children = collections.OrderedDict(
        (name, as_persistent(child, persistence, module_src))
        for name, child in module._modules.items()
        if not isinstance(child, KeyedDropout)  # EDM's dropout is functional: no module in its tree
    )
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container.__dict__["_modules"] = children  # a plain torch.nn class holding persistent children
        return container
    state = dict(
        training=False,
        _parameters=collections.OrderedDict((k, nn.Parameter(v.detach().clone(), requires_grad=False))
                                            for k, v in module._parameters.items() if v is not None),
        _buffers=collections.OrderedDict((k, None if v is None else v.clone()) for k, v in module._buffers.items()),
        _non_persistent_buffers_set=set(),
        _modules=children,
        _init_args=(),
        _init_kwargs={},
    )
    return persistence.Persistent(type(module).__name__, state, module_src)


def write_pickle(path: Path, persistence: Any, net: nn.Module, kind: str, init_kwargs: dict[str, Any],
                 protocol: int, module_src: str, *, loss_fn: Any = None, encoder: Any = None) -> None:
    import dnnlib

    inner = as_persistent(net, persistence, module_src)
    modules: dict[str, Any] = {"model" if kind == "edm" else "unet": inner}
    if kind == "edm2":  # EDM2's Precond also owns the uncertainty (logvar) head, which ECT does not use
        modules["logvar_fourier"] = persistence.Persistent("MPFourier", dict(
            _parameters={}, _buffers={"freqs": torch.randn(8), "phases": torch.rand(8)}, _modules={}), module_src)
        modules["logvar_linear"] = persistence.Persistent("MPConv", dict(
            _parameters={"weight": nn.Parameter(torch.randn(1, 8))}, _buffers={}, _modules={}), module_src)
    precond_state = dict(training=False, _parameters={}, _buffers={}, _modules=collections.OrderedDict(modules),
                         _init_args=(), _init_kwargs=dnnlib.EasyDict(init_kwargs), sigma_data=0.5)
    precond = persistence.Persistent("EDMPrecond" if kind == "edm" else "Precond", precond_state, module_src)
    loss = loss_fn if loss_fn is not None else persistence.Persistent(
        "EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), module_src)
    if kind == "edm":
        data: Any = dict(ema=precond, loss_fn=loss, augment_pipe=None,
                         dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
    else:
        data = dnnlib.EasyDict(ema=precond, loss_fn=loss,
                               encoder=encoder if encoder is not None else persistence.Persistent("StandardRGBEncoder", {}, ""))
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=protocol)


def randomised(cfg: NetConfig) -> nn.Module:
    torch.manual_seed(0)
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move zero-initialised gains so outputs depend on every weight
    return net.eval()


def booby_trap(tmp_path: Path) -> tuple[str, Path]:
    """Module source that, if ever executed, leaves a marker file."""
    marker = tmp_path / "EXECUTED"
    return f"open({str(marker)!r}, 'w').write('embedded code ran')\n", marker


# ---------------------------------------------------------------------------------------------- round trips


class SystemCall:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


# ---------------------------------------------------------------------------------------------- fast-path configs


def small_cfg(channels: int = 3, dropout: float = 0.2, precision: str = "fp32", compile: bool = False, batch: int = 16):
    cfg = get_preset("cifar10", "tune")
    net = replace(SMALL_CONFIGS["small"], img_channels=channels, dropout=dropout, attn_resolutions=(16,))
    return replace(cfg, net=net, train=replace(cfg.train, batch=batch, precision=precision),
                   runtime=replace(cfg.runtime, compile=compile, sample_kimg=0.0))


def random_data(cfg, n: int = 64):
    """n random uint8 images of cfg's shape, with random labels if the network is class-conditional."""
    from ectune.data import ImageDataset

    g = torch.Generator().manual_seed(3)
    c, res, k = cfg.net.img_channels, cfg.net.img_resolution, cfg.net.label_dim
    labels = torch.randint(0, k, (n,), generator=g) if k else None
    return ImageDataset(torch.randint(0, 256, (n, c, res, res), dtype=torch.uint8, generator=g), labels, k, "random")


def last_stage_nimg(cfg) -> int:
    from ectune.objectives import last_stage_start

    return last_stage_start(cfg.objective, total_nimg=cfg.train.total_kimg * 1000)


def opt_state_snapshot(opt, params):
    return [p.detach().clone() for p in params] + [
        v.detach().clone() for p in params for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


def cpu_has_bf16() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def load_benchmark(name: str):
    """The module benchmarks/<name>.py (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# ---------------------------------------------------------------------------------------------- latent models


def save_tiny_vae(folder: Path) -> Path:
    """A randomly initialised diffusers AutoencoderKL (3 -> 4 channels, downsampling 2: 16×16 images <-> 4×8×8
    latents), saved with save_pretrained so that tests load it through the real loading code, by path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_png_classes(folder: Path, n_per_class: int = 2, size: int = 20, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """Random RGB PNGs in class subfolders (labels 0, 1, ...), non-square so encoding must centre-crop them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder
