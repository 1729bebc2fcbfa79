"""`ECTUNet`: an ectune model (network + EDM preconditioner) as a diffusers `ModelMixin`/`ConfigMixin`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

from ...config import RunConfig, from_dict


@dataclass
class ECTUNetOutput(BaseOutput):
    """sample: f_θ(x, t), the consistency function's estimate of the clean image [N, C, H, W] in about [-1, 1]."""

    sample: Tensor


class ECTUNet(ModelMixin, ConfigMixin):
    """f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (Eq. 7) of an ectune model.

    The diffusers config holds the model's whole ectune `RunConfig` (`run_config`, as `ectune.config.to_dict`
    writes it) and the boundary of consistency sampling (`sigma_min_shift`), so the folder alone rebuilds it.
    The weights are the ectune network's, under the prefix `precond.net.`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, run_config: dict[str, Any], sigma_min_shift: float = 0.0) -> None:
        super().__init__()
        from ...model import build_model
        from ...precond import replace_precond

        cfg = from_dict(RunConfig, run_config, where="ECTUNet config run_config")
        self.precond = replace_precond(build_model(cfg), sigma_min_shift=float(sigma_min_shift))

    @property
    def run_config(self) -> RunConfig:
        return from_dict(RunConfig, self.config.run_config, where="ECTUNet config run_config")

    @property
    def label_dim(self) -> int:
        return self.precond.label_dim

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> ECTUNetOutput | tuple[Tensor]:
        """sample [N, C, H, W] noisy images at noise level `timestep` (t: a number or [N]); class_labels [N] int
        or [N, label_dim] one-hot for class-conditional models. Returns f_θ(sample, t) in fp32."""
        out = self.precond(sample, torch.as_tensor(timestep, dtype=torch.float32, device=sample.device), class_labels)
        return ECTUNetOutput(sample=out) if return_dict else (out,)
