"""The one typed, frozen config tree. The CLI is generated from it (tyro); presets are instances of it.

Every hyperparameter of the method lives here with the paper's default and symbol name
(REFERENCE.md / paper sections cited in the field comments). Progress is measured in images (kimg),
never in optimiser steps, so batch size and GPU count do not change any schedule.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

ArchName = Literal["ddpmpp", "edm2"]
ObjectiveName = Literal["diffusion", "ect", "ict"]
WeightingName = Literal[
    "edm", "one", "inv_t", "inv_dt", "inv_t_plus_inv_sigma_data", "inv_t2", "inv_t2_plus_1",
    "inv_t2_plus_inv_sigma_data2", "inv_t2_plus_sigma_data2",
]


@dataclass(frozen=True)
class NetConfig:
    """Network architecture (REFERENCE §7). `arch` picks the family; unused fields are ignored by the other."""

    arch: ArchName = "ddpmpp"
    img_resolution: int = 32
    img_channels: int = 3
    label_dim: int = 0  # number of classes; 0 = unconditional
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4
    channel_mult_noise: int = 1
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    dropout_res: int = 1 << 30  # dropout only at feature resolutions <= this (EDM2 recipe: 16)
    embedding_type: Literal["positional", "fourier"] = "positional"
    augment_dim: int = 0  # EDM's augmentation-label input (9 in the public EDM CIFAR-10 checkpoints)
    label_balance: float = 0.5  # EDM2 only
    concat_balance: float = 0.5  # EDM2 only
    checkpointing: bool = False  # gradient checkpointing per block (largest models)


@dataclass(frozen=True)
class PrecondConfig:
    """EDM preconditioning (Eq. 7, REFERENCE §1)."""

    sigma_data: float = 0.5
    # Explicit option for the reference code's σ_min-shifted boundary; 0 = the paper's exact f(x, 0) = x.
    sigma_min_shift: float = 0.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """Training objective: diffusion pretraining (r = 0), ECT, or the iCT baseline (REFERENCE §2-4)."""

    kind: ObjectiveName = "ect"
    P_mean: float = -1.1
    P_std: float = 2.0
    # ECT mapping r(t) (Eq. 15/18)
    mapping: Literal["sigmoid", "const"] = "sigmoid"
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_kimg: float = 0.0  # d in images/1000; 0 = total_kimg / stages
    stages: int = 8  # used only when stage_kimg = 0: d = total / stages
    from_scratch: bool = False  # a = floor(nimg/d) (a = 0: pure diffusion) instead of floor(nimg/d) + 1
    # loss weighting (Tab. 3, Eq. 16)
    weighting: WeightingName = "inv_dt"
    p: float = 0.5  # adaptive weighting power; 0 = plain squared L2
    c: float = 0.0  # adaptive weighting constant
    metric: Literal["l2", "l1"] = "l2"  # l1 = the 1/(||Δ||_1 + c) variant of Tab. 4
    # iCT baseline (REFERENCE §4)
    ict_s0: int = 10
    ict_s1: int = 1280
    ict_fixed_n: int = 0  # > 0: fixed discretisation (no curriculum), for the curse-of-consistency study
    ict_c_scale: float = 0.00054  # pseudo-Huber c = ict_c_scale * sqrt(data dimension)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["radam", "adam"] = "radam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # "invsqrt": lr / sqrt(max(step / t_ref, 1)) with steps counted as nimg / batch (EDM2, REFERENCE §3.7)
    schedule: Literal["const", "invsqrt"] = "const"
    t_ref_kimg: float = 256.0  # t_ref = 2000 steps x batch 128
    warmup_kimg: float = 0.0
    grad_clip: float = 0.0  # 0 = off


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights (REFERENCE §3.7)."""

    kind: Literal["fixed", "halflife", "power"] = "fixed"
    beta: float = 0.9999  # fixed β per optimiser step
    halflife_kimg: float = 500.0  # half-life in images, batch-size independent
    sigma_rels: tuple[float, ...] = (0.05,)  # EDM2 power-function EMA; the first is the one exported


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from (see ectune.data)."""

    source: Literal["fashion-mnist", "idx", "edm", "torchvision"] = "fashion-mnist"
    path: str = ""  # directory/file of the data; "" = the source's default location
    name: str = ""  # torchvision dataset class name, e.g. "CIFAR10"
    split: Literal["train", "test"] = "train"
    resolution: int = 0  # pad (centred) to this size; 0 = native size
    use_labels: bool = False
    xflip: bool = False  # random horizontal flips, on the device
    download: bool = False  # torchvision only


@dataclass(frozen=True)
class SampleConfig:
    """Sampling defaults stored with exported models (REFERENCE §5)."""

    t_max: float = 80.0
    mid_t: tuple[float, ...] = (0.821,)  # intermediate times for 2+ step sampling
    heun_steps: int = 18  # EDM Heun: 2*steps - 1 NFE
    sigma_min: float = 0.002
    rho: float = 7.0


@dataclass(frozen=True)
class TrainConfig:
    total_kimg: float = 12800.0
    batch: int = 128  # global batch (all ranks, all accumulation rounds)
    accum: int = 1  # gradient accumulation rounds per optimiser step
    seed: int = 0
    # The inner network's precision per step (ectune.precond.resolve_precision): auto = staged on CUDA, fp32 on the
    # CPU; staged = bf16 autocast while the ECT stage's largest r/t is ≤ 0.7, fp32 with TF32 up to 0.96875, fp32
    # beyond: reduced precision's rounding noise would swamp Δ = f(x_t, t) − f(x_r, r) as r/t → 1
    # (docs/performance.md has the measurements).
    precision: Literal["auto", "staged", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = False  # TF32 for all fp32 convolutions/matmuls on CUDA (it rounds their inputs to 10 mantissa bits)
    compile: bool = False
    # Recompute GroupNorm + SiLU in backward instead of saving the norm output (bit-identical gradients, about a
    # quarter less activation memory for one more element-wise pass): auto = on for eager CUDA training, where
    # memory is the limit; off on the CPU, where the pass costs time; inside torch.compile inductor decides.
    recompute_norms: Literal["auto", "on", "off"] = "auto"
    device: str = "auto"
    status_kimg: float = 10.0  # status line interval
    save_kimg: float = 100.0  # training-state + model export interval
    sample_kimg: float = 500.0  # sample-grid interval (0 = off)
    eval_kimg: float = 0.0  # FD evaluation interval (0 = off)
    eval_metric: str = "lite0"
    eval_n: int = 2000
    max_bad_steps: int = 20  # consecutive non-finite steps before stopping
    num_workers: int = 0


@dataclass(frozen=True)
class RunConfig:
    net: NetConfig = field(default_factory=NetConfig)
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output, rejecting unknown fields by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, where=f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _resolved_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two configs of the same type differ."""
    out: list[str] = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(va) and dataclasses.is_dataclass(vb):
            out += diff(va, vb, prefix=name + ".")
        elif va != vb:
            out.append(f"{name}: {vb!r} (stored) vs {va!r} (given)")
    return out
