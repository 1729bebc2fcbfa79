"""ectune models in 🤗 diffusers (`pip install 'ectune[diffusers]'`).

- `ECTUNet`: ectune's f_θ (the network inside the EDM preconditioner) as a diffusers `ModelMixin`; its output is
  the consistency function's estimate of the clean image.
- `ECTScheduler`: 1/2/N-step consistency sampling (REFERENCE §5) as a diffusers scheduler: its timesteps are the
  noise levels t themselves (t_max, then the intermediate times `mid_t`).
- `ECTPipeline`: the two together; `pipe(batch_size, num_inference_steps=2, seeds=[...])` gives the same images as
  `ectune sample` for those seeds; `image=` with `strength=` samples image-to-image.

`ectune export --format diffusers MODEL DIR` writes a folder that `ECTPipeline.from_pretrained(DIR)` loads, and
`DiffusionPipeline.from_pretrained(DIR, custom_pipeline=..., trust_remote_code=True)` too (docs/ecosystem.md).
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as exc:  # one clear sentence instead of a traceback into diffusers' absence
    raise ImportError("ectune.integrations.diffusers needs the diffusers package: pip install 'ectune[diffusers]'") from exc

from .pipeline import ECTPipeline
from .scheduler import ECTScheduler, ECTSchedulerOutput
from .unet import ECTUNet, ECTUNetOutput

__all__ = ["ECTPipeline", "ECTScheduler", "ECTSchedulerOutput", "ECTUNet", "ECTUNetOutput"]
