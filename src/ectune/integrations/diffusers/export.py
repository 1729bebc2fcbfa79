"""`ectune export --format diffusers`: a folder in diffusers' layout that loads as an `ECTPipeline`.

    model_index.json                      the pipeline's components (diffusers' own save_pretrained writes it)
    unet/config.json, unet/diffusion_pytorch_model.safetensors     ECTUNet: the ectune config and weights
    scheduler/scheduler_config.json       ECTScheduler: t_max, mid_t, σ_d, default steps
    pipeline_ectune.py                    two lines that import ECTPipeline from ectune, for custom_pipeline=
    README.md                             the model card (library_name: diffusers)

The pipeline code lives in ectune (installed with `pip install 'ectune[diffusers]'`), not in the folder: the
folder's .py only points diffusers' `custom_pipeline` loader at it.
"""

from __future__ import annotations

from pathlib import Path

from ...hub.card import CardInfo, default_steps, render_card
from ...hub.export import check_destination, describe_model, staged_folder

CUSTOM_PIPELINE_FILE = "pipeline_ectune.py"
CUSTOM_PIPELINE_SOURCE = '''\
"""Loads this folder with diffusers: DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline="pipeline_ectune",
trust_remote_code=True). The pipeline, model and scheduler are ectune's (pip install 'ectune[diffusers]')."""

from ectune.integrations.diffusers import ECTPipeline, ECTScheduler, ECTUNet  # noqa: F401
'''


def export_diffusers(source: Path | str, dest: Path, *, name: str | None = None, licence: str | None = None,
                     repo_id: str | None = None, force: bool = False) -> CardInfo:
    """Write the diffusers folder of `source` (run directory, model file or hf:// reference) to `dest`."""
    from ...config import to_dict
    from ...model import load_model, sampling_boundary
    from ...runtime.checkpoint import atomic_write_text
    from . import ECTPipeline, ECTScheduler, ECTUNet

    check_destination(dest)
    path, info = describe_model(source, name=name, licence=licence, repo_id=repo_id, library_name="diffusers")
    cfg = info.cfg
    if cfg.objective.kind == "diffusion" and not force:
        raise ValueError(f"{source} is a diffusion model (pretrained, not tuned), and ECTPipeline samples with "
                         "consistency steps, which give it blurs: tune it first (`ectune tune --init`), or pass --force")
    model, _, _ = load_model(path)
    unet = ECTUNet(run_config=to_dict(cfg), sigma_min_shift=sampling_boundary(cfg))
    unet.precond.net.load_state_dict(model.net.state_dict(), strict=True)
    scheduler = ECTScheduler(t_max=cfg.sample.t_max, mid_t=list(cfg.sample.mid_t), sigma_data=cfg.precond.sigma_data,
                             num_inference_steps=default_steps(cfg) if cfg.objective.kind != "diffusion" else 1)
    with staged_folder(dest) as tmp:
        ECTPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / CUSTOM_PIPELINE_FILE, CUSTOM_PIPELINE_SOURCE)
        atomic_write_text(tmp / "README.md", render_card(info))
    return info
