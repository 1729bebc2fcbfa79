"""The model card (README.md with YAML front-matter) and config.json of a Hub-style model folder.

Pure functions of a `CardInfo`: no file is read here. The front-matter follows the Hub's model-card metadata
(`library_name`, `pipeline_tag`, `license`, `datasets`, `base_model`, `tags`, `model-index` for results) plus a
`sampler` block with ectune's sampling defaults. The Hub has no pipeline tag for class-conditional generation, so
class-conditional models carry `unconditional-image-generation` (what the model does without a prompt) and the
tag `class-conditional`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..config import RunConfig, to_dict
from .licence import CC_BY_NC_SA, Provenance
from .metrics import Measurement

PIPELINE_TAG = "unconditional-image-generation"
# Hub dataset ids of the data sources ectune knows by name (the Hub redirects these canonical ids).
_HUB_DATASETS = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "mnist": "mnist",
                 "kmnist": "kmnist", "cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn", "stl10": "stl10",
                 "imagenet": "imagenet-1k"}


@dataclass(frozen=True)
class CardInfo:
    """Everything a card says about one model."""

    name: str
    cfg: RunConfig
    extra: dict[str, Any]
    params: int
    provenance: Provenance
    metrics: list[Measurement] = field(default_factory=list)
    repo_id: str | None = None  # where it will live, for the usage lines (None: a placeholder)
    library_name: str = "ectune"  # "diffusers" for a diffusers-format folder


def hub_dataset(cfg: RunConfig, extra: dict[str, Any]) -> str | None:
    """The Hub dataset id of the training data, where it is one ectune recognises (by source, name, path, preset)."""
    d = cfg.data
    hints = [d.source if d.source != "edm" and d.source != "idx" else "", d.name, d.path.rsplit("/", 1)[-1],
             str(extra.get("preset", ""))]
    for hint in hints:
        key = re.sub(r"[^a-z0-9]", "", hint.lower().replace("fashion-mnist", "fashionmnist"))
        for name, hub_id in sorted(_HUB_DATASETS.items(), key=lambda kv: -len(kv[0])):  # cifar100 before cifar10
            if key and key.startswith(name.replace("-", "")):
                return hub_id
    return None


def default_steps(cfg: RunConfig) -> int:
    """The steps a card recommends: 2 for consistency models with an intermediate time (better than 1 at 2 NFE)."""
    return 2 if cfg.sample.mid_t else 1


def sampler_defaults(cfg: RunConfig) -> dict[str, Any]:
    from ..model import sampling_boundary

    if cfg.objective.kind == "diffusion":
        return {"method": "heun", "steps": cfg.sample.heun_steps, "t_max": cfg.sample.t_max,
                "sigma_min": cfg.sample.sigma_min, "rho": cfg.sample.rho}
    return {"method": "consistency", "steps": default_steps(cfg), "t_max": cfg.sample.t_max,
            "mid_t": list(cfg.sample.mid_t), "sigma_min_shift": sampling_boundary(cfg)}


def hub_config(info: CardInfo) -> dict[str, Any]:
    """config.json: what a Hub page or tool reads without ectune; the model file's metadata stays authoritative."""
    net = info.cfg.net
    return {
        "library_name": "ectune", "ectune_version": __version__, "format": "ectune-model-v1",
        "model_file": "model.safetensors", "objective": info.cfg.objective.kind, "arch": net.arch,
        "img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": net.label_dim,
        "params": info.params, "nimg": info.extra.get("nimg"), "sampler": sampler_defaults(info.cfg),
        "license": info.provenance.licence, "config": to_dict(info.cfg),
    }


# ---------------------------------------------------------------------------------------------- YAML

_PLAIN_KEY = re.compile(r"^[A-Za-z_][\w-]*$")


def _scalar(v: Any) -> str:
    # JSON scalars are YAML scalars (strings double-quoted, so no value is misread as a number or a boolean).
    return json.dumps(v, ensure_ascii=False)


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines for nested dicts and lists of JSON scalars (all the front-matter needs)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            key = k if _PLAIN_KEY.match(k) else _scalar(k)
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{key}:")
                lines.extend(to_yaml(v, indent + (0 if isinstance(v, list) else 2)))
            else:
                lines.append(f"{pad}{key}: {_scalar(v) if not isinstance(v, (dict, list)) else ('{}' if isinstance(v, dict) else '[]')}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict) and v:
                inner = to_yaml(v, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines.extend(inner[1:])
            elif isinstance(v, list) and v:
                lines.append(f"{pad}-")
                lines.extend(to_yaml(v, indent + 2))
            else:
                lines.append(f"{pad}- {_scalar(v)}")
    else:
        lines.append(pad + _scalar(value))
    return lines


# ---------------------------------------------------------------------------------------------- card


def _sampler_text(m: Measurement) -> str:
    if m.sampler == "heun":
        return f"EDM Heun, {m.steps} steps"
    return f"{m.steps} step{'s' if m.steps > 1 else ''}" + (f", mid_t {', '.join(f'{t:g}' for t in m.mid_t)}" if m.mid_t else "")


def front_matter(info: CardInfo) -> dict[str, Any]:
    cfg = info.cfg
    dataset = hub_dataset(cfg, info.extra)
    tags = ["ectune", "consistency-model" if cfg.objective.kind != "diffusion" else "diffusion-model",
            "easy-consistency-tuning", "image-generation"]
    if cfg.net.label_dim:
        tags.append("class-conditional")
    if info.library_name != "ectune":
        tags.append("ectune")
    meta: dict[str, Any] = {"library_name": info.library_name, "pipeline_tag": PIPELINE_TAG,
                            "license": info.provenance.licence, "tags": list(dict.fromkeys(tags))}
    if dataset:
        meta["datasets"] = [dataset]
    if info.provenance.base_model:
        meta["base_model"] = info.provenance.base_model
    meta["sampler"] = sampler_defaults(cfg)
    if info.metrics:
        task = {"type": PIPELINE_TAG, "name": ("class-conditional" if cfg.net.label_dim else "unconditional")
                + " image generation"}
        results = []
        for m in info.metrics:
            metric = {"type": m.metric.lower(), "name": f"{m.metric} ({_sampler_text(m)}, {m.nfe} NFE, n={m.n})",
                      "value": round(m.value, 4),
                      "args": {"sampler": m.sampler, "steps": m.steps, "nfe": m.nfe, "n_samples": m.n,
                               **({"mid_t": list(m.mid_t)} if m.mid_t else {}),
                               **({"seeds": list(m.seeds)} if m.seeds else {}),
                               "reference": m.reference, "kimg": m.kimg, "source": m.source}}
            results.append({"task": task, "dataset": {"name": m.reference, "type": dataset or "custom"},
                            "metrics": [metric]})
        meta["model-index"] = [{"name": info.name, "results": results}]
    return meta


def _licence_text(p: Provenance) -> str:
    if p.licence == CC_BY_NC_SA:
        return ("**CC BY-NC-SA 4.0** (non-commercial, attribution, share-alike). These weights derive from NVIDIA's "
                f"public EDM/EDM2 checkpoints and inherit their licence: {p.reason}. ectune itself (the code) is MIT.")
    return f"**MIT**, like ectune: {p.reason}."


def render_card(info: CardInfo) -> str:
    """README.md: front-matter, then what the model is, how to sample it, what was measured and its licence."""
    cfg, net = info.cfg, info.cfg.net
    ref = f"hf://{info.repo_id}" if info.repo_id else "hf://OWNER/NAME"
    kind = "diffusion model" if cfg.objective.kind == "diffusion" else f"consistency model ({cfg.objective.kind.upper()})"
    cond = f"class-conditional ({net.label_dim} classes)" if net.label_dim else "unconditional"
    nimg = info.extra.get("nimg")
    s = sampler_defaults(cfg)
    dataset = hub_dataset(cfg, info.extra)
    lines = ["---", *to_yaml(front_matter(info)), "---", "", f"# {info.name}", "",
             f"An {cond} {kind} trained with ectune (Easy Consistency Tuning, "
             "*Consistency Models Made Easy*, Geng et al.).", "",
             "| | |", "|---|---|",
             f"| network | {net.arch}, {net.img_resolution}×{net.img_resolution}×{net.img_channels}, "
             f"{info.params / 1e6:.2f}M parameters |",
             f"| training | {cfg.objective.kind}, {'?' if nimg is None else f'{nimg / 1000:g}'} kimg (images seen, thousands) |",
             f"| data | {dataset or cfg.data.source}" + (f" (`{cfg.data.path}`)" if cfg.data.path else "") + " |",
             f"| licence | {info.provenance.licence} |", "", "## Sampling", ""]
    if info.library_name == "diffusers":
        lines += ["```python", "import ectune.integrations.diffusers  # registers ECTPipeline (pip install 'ectune[diffusers]')",
                  "from ectune.integrations.diffusers import ECTPipeline", "",
                  f"pipe = ECTPipeline.from_pretrained({(info.repo_id or 'OWNER/NAME')!r})",
                  f"images = pipe(batch_size=4, num_inference_steps={s['steps']}, seeds=[0, 1, 2, 3]).images", "```", ""]
    else:
        steps = "--method heun" if s["method"] == "heun" else (
            f"--steps {s['steps']}" + (f" --mid-t {' '.join(f'{t:g}' for t in s['mid_t'][: s['steps'] - 1])}" if s["steps"] > 1 else ""))
        lines += ["```bash", "pip install 'ectune[hub]'",
                  f"ectune sample {ref} {steps} --n 64 --seed 0 --out grid.png", "```", "",
                  "```python", "from ectune.model import load_model, sample_images", "import torch", "",
                  f"model, cfg, meta = load_model({ref!r})",
                  f"images = sample_images(model, cfg, torch.arange(16), steps={s['steps']})   # [-1, 1]", "```", ""]
    lines += ["Sampler defaults (stored with the weights): " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "method")
              + ".", ""]
    lines += ["## Measurements", ""]
    if info.metrics:
        lines += ["| metric | sampler | NFE | samples | seeds | reference | value | weights at | source |",
                  "|---|---|---:|---:|---|---|---:|---|---|"]
        for m in info.metrics:
            at = "?" if m.kimg is None else f"{m.kimg:g} kimg"
            if m.kimg is not None and nimg is not None and abs(m.kimg - nimg / 1000) > 1e-9:
                at += f" (these weights: {nimg / 1000:g} kimg)"
            seeds = f"{m.seeds[0]}–{m.seeds[1]}" if m.seeds else "?"
            lines.append(f"| {m.metric} | {_sampler_text(m)} | {m.nfe} | {m.n} | {seeds} | {m.reference} | "
                         f"{m.value:.2f} | {at} | {m.source} |")
        lines += ["", "Fréchet distances depend on the feature extractor, the number of samples and the reference set: "
                  "compare only numbers measured the same way. FD-Lite0 is not FID.", ""]
    else:
        lines += ["None recorded with this model (`ectune eval` writes them).", ""]
    lines += ["## Licence", "", _licence_text(info.provenance), ""]
    return "\n".join(lines)
