"""`ECTScheduler`: ectune's multistep consistency sampling (REFERENCE §5) in diffusers' scheduler interface.

Timesteps are the noise levels t themselves, decreasing: (t_max,) for 1 step, (t_max, mid_t[0]) for 2, ... The
model's output at t is the clean-image estimate f(x, t); `step` re-noises it to the next time,
x ← f + t_next·z, and returns f itself after the last time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

from ...img2img import img2img_sigmas, strength_to_t
from ...schedules import consistency_sigmas


@dataclass
class ECTSchedulerOutput(BaseOutput):
    """prev_sample: the input of the next model call (the final images after the last step);
    denoised: this step's clean-image estimate f(x, t)."""

    prev_sample: Tensor
    denoised: Tensor


class ECTScheduler(SchedulerMixin, ConfigMixin):
    """Consistency sampling with intermediate times `mid_t` (e.g. 0.821 for CIFAR-10, 1.526 for ImageNet-64)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, t_max: float = 80.0, mid_t: Sequence[float] = (0.821,), sigma_data: float = 0.5,
                 num_inference_steps: int = 1) -> None:
        self.timesteps: Tensor = consistency_sigmas(num_inference_steps, t_max=t_max, mid_t=tuple(mid_t))
        self.num_inference_steps = num_inference_steps

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the starting noise: the first time."""
        return float(self.timesteps[0])

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None, *,
                      timesteps: Sequence[float] | None = None, mid_t: Sequence[float] | None = None,
                      t_start: float | None = None) -> None:
        """Choose the times: `timesteps` given explicitly (decreasing noise levels), or `num_inference_steps` from
        t_max (or from `t_start`, for image-to-image) through the intermediate times (`mid_t`, default the
        config's)."""
        if timesteps is not None:
            if num_inference_steps is not None or mid_t is not None or t_start is not None:
                raise ValueError("pass either timesteps= or num_inference_steps=/mid_t=/strength, not both")
            ts = [float(t) for t in timesteps]
            if not ts or ts[-1] <= 0 or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] > self.config.t_max:
                raise ValueError(f"timesteps must be noise levels strictly decreasing inside (0, t_max = "
                                 f"{self.config.t_max}], got {ts}")
            sigmas = torch.tensor(ts, dtype=torch.float64)
        else:
            steps = self.config.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
            times = tuple(self.config.mid_t) if mid_t is None else tuple(float(t) for t in mid_t)
            if t_start is None:
                sigmas = consistency_sigmas(steps, t_max=self.config.t_max, mid_t=times)
            else:
                sigmas = img2img_sigmas(t_start, steps, times, explicit=mid_t is not None, t_max=self.config.t_max)
            ts = sigmas.tolist()
            if ts[-1] <= 0 or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"mid_t must decrease inside (0, t_max = {self.config.t_max}), got {ts[1:]}")
        self.timesteps = sigmas.to(device) if device is not None else sigmas
        self.num_inference_steps = len(sigmas)

    def strength_to_t(self, strength: float) -> float:
        """Image-to-image starting time of a strength in (0, 1] (`ectune.img2img.strength_to_t`)."""
        return strength_to_t(strength, sigma_data=self.config.sigma_data, t_max=self.config.t_max)

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """The model takes x itself (its preconditioner scales it)."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: float | Tensor) -> Tensor:
        """x_t = x_0 + t·ε (the forward process of REFERENCE §1)."""
        t = torch.as_tensor(timesteps, dtype=original_samples.dtype, device=original_samples.device).reshape(-1, 1, 1, 1)
        return original_samples + noise * t

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, *, noise: Tensor | None = None,
             generator: torch.Generator | None = None, return_dict: bool = True) -> ECTSchedulerOutput | tuple[Tensor]:
        """From the model's clean-image estimate at `timestep` to the next model input: f + t_next·z, with z =
        `noise` (or drawn with `generator`), or f itself after the last time."""
        times = [float(t) for t in self.timesteps]
        t = float(timestep)
        if t not in times:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps {times}; call set_timesteps first")
        i = times.index(t)
        denoised = model_output
        if i + 1 < len(times):
            if noise is None:
                noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype,
                                    device=generator.device if generator is not None else model_output.device)
            prev = denoised + times[i + 1] * noise.to(denoised)
        else:
            prev = denoised
        return ECTSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev,)
