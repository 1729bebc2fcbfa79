"""`ectune sample`: images from a model file or run directory, sample i from seed + i (split across ranks under
torchrun), written as a PNG grid, an .npz or a folder of PNGs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Sequence

import tyro

from .common import Flag, check_mid_t, optional, parse, with_sampling_boundary

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig


@dataclass(frozen=True, kw_only=True)
class SampleArgs:
    """generate images from a model or run directory"""

    model: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """model .safetensors file or run directory"""
    steps: int = 1
    """consistency steps (1, 2, ...)"""
    mid_t: Annotated[tuple[float, ...] | None, optional("T [T ...]", unset="the model's")] = None
    """intermediate times"""
    method: Literal["consistency", "heun"] = "consistency"
    sigma_min_shift: Annotated[float | None, optional("S", unset="the model's sample.sigma_min_shift")] = None
    """boundary f(x, σ_min) = x of consistency sampling (0.003: the public ECT checkpoints; 0: exact f(x, 0) = x)"""
    n: int = 64
    seed: int = 0
    """first seed; sample i uses seed+i"""
    class_label: Annotated[int | None, tyro.conf.arg(name="class", metavar="K",
                                                     help_behavior_hint="(optional)")] = None
    """class id for conditional models"""
    batch: int = 256
    device: str = "auto"
    out: Path
    """grid.png, images.npz, or a directory for PNGs"""
    force: Flag = False
    """consistency-sample a diffusion model anyway"""
    guidance: float = 1.0
    """guidance weight w: f_g + w·(f − f_g), f_g the unconditional label or --guide (1 = none; 2 NFE per step)"""
    guide: Annotated[Path | None, optional("MODEL", unset="classifier-free: the model's unconditional label")] = None
    """weaker or unconditional model as f_g (autoguidance)"""
    latents: Flag = False
    """latent models: write the model's latents (.npy or .safetensors) instead of decoded images"""
    init_image: Annotated[Path | None, optional("PATH", unset="none: generate from noise")] = None
    """image-to-image: start every sample from this image noised to --t (or --strength), then take --steps steps"""
    t: Annotated[float | None, optional("T", unset="from --strength")] = None
    """image-to-image starting time (noise level) in (0, t_max]: 0.3 keeps much of the image, 3 little"""
    strength: Annotated[float | None, optional("S", unset="0.8 unless --t is given")] = None
    """image-to-image noise share in (0, 1]: t = σ_d·S/√(1 − S²) (0.5 → t 0.29, 0.8 → 0.67, 0.9 → 1.03, 1 → t_max)"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(SampleArgs, command, argv)
    for name in ("steps", "n", "batch"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} {getattr(a, name)}: expected an integer >= 1")
    if not 0 <= a.seed <= 2**63 - 1 - a.n:
        raise ValueError(f"--seed {a.seed}: expected an integer in [0, 2**63 - n)")
    import torch

    from ..imageio import save_images
    from ..model import class_columns, load_model, sample_images
    from ..runtime import distributed as rt_dist
    from ..runtime.device import resolve_device
    from ..sampling import to_uint8

    device = resolve_device(a.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = rt_dist.init_distributed(device.type)  # under torchrun each rank samples a slice of the seeds
    model, cfg, extra = load_model(a.model, device=device)
    cfg = with_sampling_boundary(cfg, a.sigma_min_shift)
    check_mid_t(a.mid_t, cfg)
    if a.method == "consistency" and extra.get("objective") == "diffusion" and not a.force:
        raise ValueError(f"{a.model} is a diffusion model (pretrained, not tuned): 1-2 consistency steps give blurs. "
                         "Use --method heun, tune it with `ectune tune --init`, or pass --force")
    seeds = torch.arange(a.seed, a.seed + a.n)
    if cfg.net.label_dim == 0 and a.class_label is not None:
        raise ValueError(f"--class {a.class_label}: the model is unconditional")
    if a.class_label is not None and not 0 <= a.class_label < cfg.net.label_dim:
        raise ValueError(f"--class {a.class_label}: the model has {cfg.net.label_dim} classes (0..{cfg.net.label_dim - 1})")
    labels = None if a.class_label is None else torch.full((a.n,), a.class_label)
    guide = _load_guide(a, model, cfg, device)
    if a.latents and not cfg.data.vae:
        raise ValueError(f"--latents: {a.model} is not a latent model (its config names no data.vae)")
    if a.latents and a.out.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--out {a.out}: with --latents, expected a .npy or .safetensors file")
    if a.init_image is not None and cfg.data.vae:
        raise ValueError(f"--init-image: {a.model} is a latent model; image-to-image sampling of latent models "
                         "(encoding the image first) is not supported")
    init, t_start = _init_image(a, cfg)
    mine = rt_dist.rank_seeds(torch.arange(a.n), dist.rank, dist.world_size)  # positions of this rank's samples
    images = sample_images(model, cfg, seeds[mine], steps=a.steps, mid_t=a.mid_t, method=a.method,
                           class_labels=None if labels is None else labels[mine], batch=a.batch, device=device,
                           init_images=init, t_start=t_start, decode=not a.latents, guidance=a.guidance, guide=guide)
    if a.latents:
        from ..latents.store import save_latents

        latents = rt_dist.all_gather_cat(images)
        if dist.is_main:
            save_latents(a.out, latents, cfg.data, seeds=(a.seed, a.seed + a.n - 1))
            print(f"wrote {a.n} latents {tuple(latents.shape[1:])} (the model's normalised space) to {a.out}")
        return 0
    images = rt_dist.all_gather_cat(to_uint8(images))
    if dist.is_main:
        out = save_images(images, a.out, cols=class_columns(cfg) if labels is None else None)
        steps = a.steps if a.method == "consistency" else cfg.sample.heun_steps
        start = "" if t_start is None else f" from {a.init_image} at t = {t_start:.4g}"
        print(f"wrote {a.n} samples ({a.method}, {steps} steps{start}, {dist.world_size} process(es)) to {out}")
    return 0


def _load_guide(a: SampleArgs, model, cfg, device):
    """The --guide model (autoguidance), checked against the model; None for classifier-free guidance."""
    import math

    if not (math.isfinite(a.guidance) and a.guidance >= 0):
        raise ValueError(f"--guidance {a.guidance}: expected a number >= 0 (1 = no guidance)")
    if a.guide is None:
        if a.guidance != 1.0 and cfg.net.label_dim == 0:
            raise ValueError(f"--guidance {a.guidance}: classifier-free guidance needs a class-conditional model; "
                             "give --guide MODEL for autoguidance")
        return None
    from ..guidance import check_guide_matches
    from ..model import load_model

    guide, gcfg, _ = load_model(a.guide, device=device)
    shape = lambda c: (c.net.img_channels, c.net.img_resolution, c.net.img_resolution)  # noqa: E731
    check_guide_matches(model, guide, model_shape=shape(cfg), guide_shape=shape(gcfg), what=f"--guide {a.guide}")
    if (gcfg.data.vae, gcfg.data.latent_mean, gcfg.data.latent_std) != (cfg.data.vae, cfg.data.latent_mean, cfg.data.latent_std):
        raise ValueError(f"--guide {a.guide}: its latents (VAE {gcfg.data.vae or 'none'}) are not the model's "
                         f"({cfg.data.vae or 'none'})")
    return guide


def _init_image(a: SampleArgs, cfg: RunConfig) -> tuple[torch.Tensor | None, float | None]:
    """The --init-image as [1, C, H, W] in [-1, 1] and its starting time (from --t or --strength); (None, None)
    when sampling from noise."""
    if a.init_image is None:
        if a.t is not None or a.strength is not None:
            raise ValueError("--t and --strength set the starting noise of --init-image; give an --init-image")
        return None, None
    from ..img2img import strength_to_t
    from ..init_image import read_image

    if a.method != "consistency":
        raise ValueError("--init-image needs --method consistency (image-to-image takes consistency steps)")
    if a.t is not None and a.strength is not None:
        raise ValueError(f"--t {a.t} and --strength {a.strength} both set the starting noise; give one")
    if a.t is not None and not 0 < a.t <= cfg.sample.t_max:
        raise ValueError(f"--t {a.t}: expected a time in (0, t_max = {cfg.sample.t_max}]")
    if a.strength is not None and not 0 < a.strength <= 1:
        raise ValueError(f"--strength {a.strength}: expected a number in (0, 1]")
    t = a.t if a.t is not None else strength_to_t(0.8 if a.strength is None else a.strength,
                                                   sigma_data=cfg.precond.sigma_data, t_max=cfg.sample.t_max)
    image = read_image(a.init_image, channels=cfg.net.img_channels, resolution=cfg.net.img_resolution)
    return image[None], t
