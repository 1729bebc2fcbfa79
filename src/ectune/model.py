"""Build, load and sample ectune models (a network inside the EDM preconditioner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .config import RunConfig
from .nets import build_net
from .precond import Precond, replace_precond
from .hub.refs import resolve_model_path
from .img2img import img2img_sample, img2img_sigmas
from .runtime.checkpoint import CheckpointError, load_model_weights, read_model_meta
from .sampling import generate
from .schedules import consistency_sigmas, heun_sigmas


def build_model(cfg: RunConfig, *, compute_dtype: torch.dtype = torch.float32) -> Precond:
    """f_θ for a config: its network wrapped in the preconditioner."""
    return Precond(
        build_net(cfg.net),
        sigma_data=cfg.precond.sigma_data,
        sigma_min_shift=cfg.precond.sigma_min_shift,
        label_dim=cfg.net.label_dim,
        compute_dtype=compute_dtype,
    )


def load_model(path: Path | str, *, device: torch.device | str = "cpu") -> tuple[Precond, RunConfig, dict[str, Any]]:
    """An exported model (file, run directory, Hub-style folder or `hf://OWNER/NAME[@REVISION]`) in eval mode, with
    its config and extra metadata."""
    path = resolve_model_path(path)  # hf:// -> its folder in the local hub cache (downloaded once)
    cfg, extra = read_model_meta(path)
    model = build_model(cfg)
    weights = load_model_weights(path)
    try:
        model.net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the network its config describes: {exc}") from exc
    return model.to(device).eval(), cfg, extra


def sampling_boundary(cfg: RunConfig) -> float:
    """σ_min of the boundary f(x, σ_min) = x that consistency sampling uses (REFERENCE §1): cfg.sample.sigma_min_shift,
    or the training boundary cfg.precond.sigma_min_shift where that is unset, so that sampling never differs from
    training unless a config asks it to."""
    shift = cfg.sample.sigma_min_shift
    shift = cfg.precond.sigma_min_shift if shift is None else shift
    if not 0 <= shift < cfg.sample.t_max:
        raise ValueError(f"the sampling boundary sigma_min_shift must be in [0, t_max = {cfg.sample.t_max}), got {shift}")
    return float(shift)


def class_columns(cfg: RunConfig) -> int | None:
    """Columns of a sample grid whose labels follow the seeds: one per class for a net with at most 16 classes
    (sample_images gives seed i the class i mod label_dim, so a column holds one class), else None (square)."""
    return cfg.net.label_dim if 0 < cfg.net.label_dim <= 16 else None


def grid_seeds(cfg: RunConfig) -> tuple[Tensor, int]:
    """Seeds and columns of the fixed-seed sample grids of training and the demo: 8 rows of `class_columns`, or 8 × 8."""
    cols = class_columns(cfg) or 8
    return torch.arange(8 * cols), cols


@torch.no_grad()
def sample_images(
    model: Precond,
    cfg: RunConfig,
    seeds: Tensor,
    *,
    steps: int = 1,
    mid_t: Sequence[float] | None = None,
    method: str = "consistency",
    class_labels: Tensor | None = None,
    batch: int = 256,
    device: torch.device | str = "cpu",
    decode: bool = True,
    guidance: float = 1.0,
    guide: Precond | None = None,
    init_images: Tensor | None = None,
    t_start: float | None = None,
) -> Tensor:
    """Float images in [-1, 1] for per-sample seeds, in batches (results do not depend on `batch`).

    Consistency sampling evaluates `model` with the boundary `sampling_boundary(cfg)` (sharing its weights); the
    Heun sampler of diffusion models uses `model` as it is. With `init_images` ([N or 1, C, H, W] in [-1, 1]) it is
    image-to-image sampling (`ectune.img2img`): each image noised to `t_start`, then `steps` consistency steps.
    A latent model (cfg.data.vae set) returns images decoded by that VAE, or with decode=False its latents.
    guidance = w != 1 samples f_g + w·(f − f_g) (`ectune.guidance.GuidedDenoiser`: the unconditional label as f_g,
    or the model `guide`; 2 NFE per step)."""
    shape = cfg.net.image_shape
    if init_images is not None:
        if method != "consistency" or t_start is None:
            raise ValueError("image-to-image sampling needs the consistency method and a starting time t_start")
        init_images = init_images.expand(len(seeds), *shape)
    if cfg.net.label_dim and class_labels is None:
        # Class of sample i follows from its seed, so it is batch-independent too.
        class_labels = seeds % cfg.net.label_dim
    if init_images is not None:
        sigmas = img2img_sigmas(t_start, steps, cfg.sample.mid_t if mid_t is None else mid_t, explicit=mid_t is not None,
                                t_max=cfg.sample.t_max)
    elif method == "consistency":
        sigmas = consistency_sigmas(steps, t_max=cfg.sample.t_max, mid_t=cfg.sample.mid_t if mid_t is None else mid_t)
    else:
        sigmas = heun_sigmas(cfg.sample.heun_steps, sigma_min=cfg.sample.sigma_min, sigma_max=cfg.sample.t_max,
                             rho=cfg.sample.rho)
    f: torch.nn.Module = model
    if method == "consistency" and sampling_boundary(cfg) != model.sigma_min_shift:
        f = replace_precond(model, sigma_min_shift=sampling_boundary(cfg))
        if guide is not None:
            guide = replace_precond(guide, sigma_min_shift=sampling_boundary(cfg))
    if guidance != 1.0 or guide is not None:
        from .guidance import GuidedDenoiser

        f = GuidedDenoiser(f, weight=guidance, guide=guide)
    out = []
    for i in range(0, len(seeds), batch):
        labels = None if class_labels is None else class_labels[i : i + batch].to(device)
        if init_images is not None:
            x = img2img_sample(f, init_images[i : i + batch], seeds[i : i + batch], sigmas=sigmas, class_labels=labels,
                               device=device)
        else:
            x = generate(f, seeds[i : i + batch], shape, sigmas=sigmas, method=method, class_labels=labels, device=device)
        if cfg.data.vae and decode:
            from .latents import decode_to_images

            x = decode_to_images(x, cfg.data, device=device)
        out.append(x.cpu())
    return torch.cat(out)
