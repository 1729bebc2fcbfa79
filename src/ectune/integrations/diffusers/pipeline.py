"""`ECTPipeline`: sampling an ectune consistency model through diffusers' pipeline interface."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from ...init_image import pil_to_tensor
from ...sampling import per_sample_normal, to_uint8
from .scheduler import ECTScheduler
from .unet import ECTUNet

ImageInput = Image.Image | Sequence[Image.Image] | Tensor
DEFAULT_STRENGTH = 0.8


class ECTPipeline(DiffusionPipeline):
    """Unconditional or class-conditional generation in 1, 2 or N consistency steps, and image-to-image.

    Randomness: `seeds=[s0, s1, ...]` draws sample i's noise from seed s_i exactly as `ectune sample` does, so
    `pipe(seeds=range(16), num_inference_steps=2)` reproduces `ectune sample MODEL --n 16 --seed 0 --steps 2`;
    otherwise `generator=` (or torch's global generator) draws it the diffusers way.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ECTUNet, scheduler: ECTScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        *,
        mid_t: Sequence[float] | None = None,
        seeds: Sequence[int] | Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: int | Sequence[int] | Tensor | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: number of images (default: len(seeds), the image batch, or 1).
            num_inference_steps: consistency steps (default: the scheduler's, 1); times t_max, then `mid_t`.
            timesteps: the noise levels themselves, decreasing (e.g. [80, 0.821]); with `image`, the first is the
                level the image is noised to.
            mid_t: intermediate times for num_inference_steps > 1 (default: the model's).
            seeds: per-sample seeds (ectune's noise; identical to `ectune sample`).
            generator: torch generator(s) for the noise when no seeds are given.
            class_labels: class id(s) of a class-conditional model (default: seed % classes, or random).
            image: image-to-image start: PIL image(s), or a tensor [C, H, W] / [N, C, H, W] in [-1, 1].
            strength: image-to-image noise share in (0, 1] (default 0.8): t = σ_d·s/√(1 − s²), at most t_max.
            output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (raw, about [-1, 1]).
        """
        net = self.unet.run_config.net
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        device = self.device
        if seeds is not None and generator is not None:
            raise ValueError("pass seeds= (ectune's per-sample noise) or generator=, not both")
        start = None if image is None else self._image_batch(image, shape)
        n = batch_size or (len(seeds) if seeds is not None else (len(start) if start is not None else 1))
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"batch_size {n} but {len(seeds)} seeds")
        if start is not None and len(start) not in (1, n):
            raise ValueError(f"{len(start)} images for a batch of {n}: pass one image or one per sample")
        seed_t = None if seeds is None else torch.as_tensor(list(seeds), dtype=torch.int64)

        t_start = None
        if start is None and strength is not None:
            raise ValueError("strength= sets how much an image= is noised; pass an image")
        if start is not None and timesteps is None:
            t_start = self.scheduler.strength_to_t(DEFAULT_STRENGTH if strength is None else strength)
        elif start is not None and strength is not None:
            raise ValueError("with timesteps= the first timestep is the image's noise level; strength= conflicts")
        self.scheduler.set_timesteps(num_inference_steps, timesteps=timesteps, mid_t=mid_t, t_start=t_start)
        times = self.scheduler.timesteps

        noise = self._noise_source(seed_t, generator, shape=(n, *shape), device=device)
        labels = self._labels(class_labels, seed_t, generator, n=n, device=device)
        if start is None:
            x = noise(0) * float(times[0])
        else:
            x = start.to(device).expand(n, *shape).float() + noise(0) * float(times[0])
        for i, t in enumerate(self.progress_bar(times)):
            denoised = self.unet(x, float(t), labels).sample
            z = noise(i + 1) if i + 1 < len(times) else None
            x = self.scheduler.step(denoised, t, x, noise=z).prev_sample

        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _noise_source(seeds: Tensor | None, generator, *, shape: tuple[int, ...], device) -> Callable[[int], Tensor]:
        """noise(i): the standard normal z_i of step i ([N, C, H, W]): ectune's stream i of each seed, or drawn."""
        if seeds is not None:
            return lambda i: per_sample_normal(seeds, shape[1:], stream=i, device=device)
        return lambda i: randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _labels(self, class_labels, seeds: Tensor | None, generator, *, n: int, device) -> Tensor | None:
        k = self.unet.label_dim
        if k == 0:
            if class_labels is not None:
                raise ValueError("class_labels given, but the model is unconditional")
            return None
        if class_labels is None:  # as `ectune sample`: the class of sample i follows from its seed
            if seeds is not None:
                return (seeds % k).to(device)
            g = generator[0] if isinstance(generator, list) else generator
            return torch.randint(0, k, (n,), generator=g, device=g.device if g is not None else "cpu").to(device)
        labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1).expand(n) if isinstance(class_labels, int) \
            else torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
        if len(labels) != n or bool(((labels < 0) | (labels >= k)).any()):
            raise ValueError(f"class_labels must be one id or {n} ids in 0..{k - 1}, got {labels.tolist()}")
        return labels.to(device)

    @staticmethod
    def _image_batch(image: ImageInput, shape: tuple[int, int, int]) -> Tensor:
        """[N, C, H, W] in [-1, 1] from PIL image(s) (converted and resized like `ectune sample --init-image`) or a
        tensor already in the model's shape and range."""
        c, h, _ = shape
        if isinstance(image, Tensor):
            x = image[None] if image.dim() == 3 else image
            if x.dim() != 4 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected [{c}, {h}, {h}] or [N, {c}, {h}, {h}] in [-1, 1]")
            return x.float()
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise ValueError("image must be a PIL image, a list of PIL images or a tensor [N, C, H, W] in [-1, 1]")
        return torch.stack([pil_to_tensor(i, channels=c, resolution=h, name="image") for i in images])

    @staticmethod
    def _postprocess(x: Tensor, output_type: str):
        if output_type == "latent":
            return x
        if output_type == "pt":
            return (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy()
        if output_type == "pil":  # rounded as `ectune sample` writes PNGs
            arr = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
            return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
        raise ValueError(f"output_type {output_type!r}: expected pil, np, pt or latent")
