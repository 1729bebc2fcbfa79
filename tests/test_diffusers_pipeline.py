"""`ectune export --format diffusers` and `ectune.integrations.diffusers`: the exported folder loads with
`ECTPipeline.from_pretrained` and with diffusers' own `DiffusionPipeline.from_pretrained(custom_pipeline=...)`,
and gives exactly the images of `ectune sample` for the same seeds and steps (unconditional and class-conditional)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from conftest import randomised  # noqa: E402
from ectune.cli import main  # noqa: E402
from ectune.config import RunConfig  # noqa: E402
from ectune.integrations.diffusers import ECTPipeline, ECTScheduler  # noqa: E402
from ectune.model import load_model, sample_images  # noqa: E402
from ectune.nets import SMALL_CONFIGS  # noqa: E402
from ectune.runtime.checkpoint import save_model  # noqa: E402

NET = replace(SMALL_CONFIGS["tiny"], img_resolution=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
              dropout=0.0)


def export(tmp_path, label_dim: int, *, objective: str = "ect") -> tuple:
    cfg = replace(RunConfig(), net=replace(NET, label_dim=label_dim))
    model_file = tmp_path / f"m{label_dim}.safetensors"
    save_model(model_file, randomised(cfg.net).state_dict(), cfg, extra={"objective": objective})
    dest = tmp_path / f"diffusers{label_dim}"
    assert main(["export", str(model_file), str(dest), "--format", "diffusers", "--license", "mit"]) == 0
    return model_file, dest


@pytest.mark.parametrize("label_dim", [0, 3])
def test_pipeline_gives_the_images_of_ectune_sample(tmp_path, label_dim):
    model_file, dest = export(tmp_path, label_dim)
    assert {p.name for p in dest.iterdir()} >= {"model_index.json", "unet", "scheduler", "pipeline_ectune.py", "README.md"}
    readme = (dest / "README.md").read_text()
    assert "library_name: \"diffusers\"" in readme and "license: \"mit\"" in readme
    pipe = ECTPipeline.from_pretrained(dest)
    pipe.set_progress_bar_config(disable=True)
    model, cfg, _ = load_model(model_file)
    seeds = torch.tensor([0, 1])
    for steps in (1, 2):
        got = pipe(seeds=seeds.tolist(), num_inference_steps=steps, output_type="latent").images
        assert torch.equal(got, sample_images(model, cfg, seeds, steps=steps))
    # Through the command line: PNG-rounded images of seeds 0, 1 at 2 steps (class 2 for the conditional model).
    out = tmp_path / "cli.npz"
    klass = ["--class", "2"] if label_dim else []
    assert main(["sample", str(model_file), "--n", "2", "--seed", "0", "--steps", "2", *klass, "--out", str(out),
                 "--device", "cpu"]) == 0
    pil = pipe(seeds=[0, 1], num_inference_steps=2, class_labels=2 if label_dim else None).images
    assert np.array_equal(np.stack([np.asarray(p).reshape(8, 8, 1) for p in pil]), np.load(out)["arr_0"])
    # Explicit timesteps, as diffusers users pass them: the noise levels themselves.
    custom = pipe(seeds=[0, 1], timesteps=[80.0, 0.5], output_type="latent").images
    assert torch.equal(custom, sample_images(model, cfg, seeds, steps=2, mid_t=(0.5,)))
    if label_dim:
        with pytest.raises(ValueError, match="class_labels must be one id or 2 ids in 0..2"):
            pipe(seeds=[0, 1], class_labels=[0, 3])


def test_diffusion_pipeline_loads_the_folder_as_a_custom_pipeline(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies custom pipeline code into its modules cache: keep that inside tmp_path.
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model_file, dest = export(tmp_path, 0)
    index = json.loads((dest / "model_index.json").read_text())
    assert index["_class_name"] == "ECTPipeline" and index["unet"] == ["ectune.integrations.diffusers.unet", "ECTUNet"]
    pipe = DiffusionPipeline.from_pretrained(dest, custom_pipeline="pipeline_ectune", trust_remote_code=True)
    assert type(pipe).__name__ == "ECTPipeline"
    pipe.set_progress_bar_config(disable=True)
    model, cfg, _ = load_model(model_file)
    got = pipe(seeds=[4, 5], num_inference_steps=2, output_type="latent").images
    assert torch.equal(got, sample_images(model, cfg, torch.tensor([4, 5]), steps=2))
    # The scheduler's default is the card's recommended 2 steps.
    assert torch.equal(pipe(seeds=[4, 5], output_type="latent").images, got)


def test_scheduler_steps():
    s = ECTScheduler(t_max=80.0, mid_t=[0.821, 0.3])
    s.set_timesteps(3)
    assert s.timesteps.tolist() == [80.0, 0.821, 0.3] and s.init_noise_sigma == 80.0
    f, x, z = torch.full((1, 1, 2, 2), 0.25), torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    assert torch.equal(s.step(f, 80.0, x, noise=z).prev_sample, f + 0.821 * z)  # re-noised to the next time
    assert torch.equal(s.step(f, 0.3, x, noise=z).prev_sample, f)  # the last step returns f itself
    s.set_timesteps(timesteps=[10.0, 1.0])
    assert s.timesteps.tolist() == [10.0, 1.0]
    for kwargs, words in (({"timesteps": [1.0, 2.0]}, "strictly decreasing"), ({"timesteps": [90.0]}, "t_max"),
                          ({"num_inference_steps": 4}, "4 steps need 3 intermediate"),
                          ({"num_inference_steps": 2, "mid_t": [81.0]}, "mid_t must decrease")):
        with pytest.raises(ValueError, match=words):
            s.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.step(f, 5.0, x, noise=z)


def test_diffusion_models_are_refused_without_force(tmp_path, capsys):
    cfg = replace(RunConfig(), net=NET)
    model_file = tmp_path / "dm.safetensors"
    save_model(model_file, randomised(cfg.net).state_dict(), replace(cfg, objective=replace(cfg.objective, kind="diffusion")),
               extra={"objective": "diffusion"})
    assert main(["export", str(model_file), str(tmp_path / "d"), "--format", "diffusers", "--license", "mit"]) == 1
    assert "is a diffusion model" in capsys.readouterr().err and not (tmp_path / "d").exists()
