"""The one typed, frozen config tree. The CLI is generated from it (tyro); presets are instances of it.

Every hyperparameter of the method lives here with the paper's default and symbol name
(REFERENCE.md / paper sections cited in the field comments). Progress is measured in images (kimg),
never in optimiser steps, so batch size and GPU count do not change any schedule.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

ArchName = Literal["ddpmpp", "edm2"]
ObjectiveName = Literal["diffusion", "ect", "ict"]
WeightingName = Literal[
    "edm", "one", "inv_t", "inv_dt", "inv_t_plus_inv_sigma_data", "inv_t2", "inv_t2_plus_1",
    "inv_t2_plus_inv_sigma_data2", "inv_t2_plus_sigma_data2",
]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_in(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


_checks_deferred: contextvars.ContextVar[bool] = contextvars.ContextVar("ectune_config_checks_deferred", default=False)


class _Validated:
    """Each config section checks its fields where it is built (from the CLI, a preset or a stored file), so a
    bad value stops with one message naming its option before anything runs."""

    _section: ClassVar[str]

    def __post_init__(self) -> None:
        if not _checks_deferred.get():
            self.check()

    def check(self) -> None:
        """Raise ValueError naming the first field outside its allowed range."""

    def _require(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            option = f"--{self._section}.{name.replace('_', '-')}"
            raise ValueError(f"{option} {getattr(self, name)!r}: expected {expected}")


@dataclass(frozen=True)
class NetConfig(_Validated):
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

    _section = "net"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's images (or latents)."""
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def check(self) -> None:
        r = self._require
        r("img_resolution", _int_in(self.img_resolution, 1, 4096), "an integer in [1, 4096]")
        r("img_channels", _int_in(self.img_channels, 1, 64), "an integer in [1, 64]")
        r("label_dim", _int_in(self.label_dim, 0, 100_000), "an integer in [0, 100000] (0 = unconditional)")
        r("model_channels", _int_in(self.model_channels, 1, 4096), "an integer in [1, 4096]")
        r("channel_mult", len(self.channel_mult) > 0 and all(_int_in(m, 1, 64) for m in self.channel_mult),
          "one or more integers in [1, 64], one per resolution level")
        widest = self.model_channels * max(self.channel_mult)
        r("model_channels", widest <= 8192, f"at most 8192 channels in the widest level, got {widest}")
        r("channel_mult_emb", _int_in(self.channel_mult_emb, 1, 64), "an integer in [1, 64]")
        r("channel_mult_noise", _int_in(self.channel_mult_noise, 1, 64), "an integer in [1, 64]")
        r("num_blocks", _int_in(self.num_blocks, 1, 64), "an integer in [1, 64]")
        r("attn_resolutions", all(_int_in(a, 1, 4096) for a in self.attn_resolutions), "resolutions >= 1")
        r("dropout", _finite(self.dropout) and 0 <= self.dropout < 1, "a probability in [0, 1)")
        r("dropout_res", _int_in(self.dropout_res, 1, 1 << 30), "a resolution >= 1")
        r("augment_dim", _int_in(self.augment_dim, 0, 4096), "an integer >= 0")
        r("label_balance", _finite(self.label_balance) and 0 <= self.label_balance <= 1, "a number in [0, 1]")
        r("concat_balance", _finite(self.concat_balance) and 0 <= self.concat_balance <= 1, "a number in [0, 1]")


@dataclass(frozen=True)
class PrecondConfig(_Validated):
    """EDM preconditioning (Eq. 7, REFERENCE §1)."""

    sigma_data: float = 0.5
    # Explicit option for the reference code's σ_min-shifted boundary; 0 = the paper's exact f(x, 0) = x.
    sigma_min_shift: float = 0.0

    _section = "precond"

    def check(self) -> None:
        self._require("sigma_data", _finite(self.sigma_data) and self.sigma_data > 0, "a number > 0")
        self._require("sigma_min_shift", _finite(self.sigma_min_shift) and self.sigma_min_shift >= 0, "a number >= 0")


@dataclass(frozen=True)
class ObjectiveConfig(_Validated):
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
    # How the adaptive weighting enters the loss (ectune.weighting.adaptive_loss). "pseudo_huber": gradient
    # w̄·w(Δ)·Δ (Eq. 20), for p = 1/2 the pseudo-Huber loss w̄·(√(‖Δ‖²+c²) − c) of the reference code, its value and
    # gradient scale; "weighted_l2": w̄·sg[w(Δ)]·‖Δ‖², twice that gradient. p = 0 is the squared L2 in both.
    loss_form: Literal["pseudo_huber", "weighted_l2"] = "pseudo_huber"
    # iCT baseline (REFERENCE §4)
    ict_s0: int = 10
    ict_s1: int = 1280
    ict_fixed_n: int = 0  # > 0: fixed discretisation (no curriculum), for the curse-of-consistency study
    ict_c_scale: float = 0.00054  # pseudo-Huber c = ict_c_scale * sqrt(data dimension)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # Guided target (ectune.guidance.GuidedDenoiser): the target pass computes f_g + w·(f − f_g), with f_g the model
    # itself under the unconditional label (classifier-free) or, when target_guide names a model file, that weaker
    # model (autoguidance). w = 1 is the unguided target of the paper.
    target_guidance: float = 1.0
    target_guide: str = ""

    _section = "objective"

    def check(self) -> None:
        r = self._require
        r("P_mean", _finite(self.P_mean), "a finite number")
        r("P_std", _finite(self.P_std) and self.P_std > 0, "a number > 0")
        # q ≤ 1 would give r = 0 (q = 1: a diffusion model, silently) or r > t (q < 1): Eq. 18 needs q > 1.
        r("q", _finite(self.q) and (self.q > 1 or self.kind != "ect"), "a number > 1 (r = t·(1 − n(t)/q^a), Eq. 18)")
        r("k", _finite(self.k) and self.k >= 0, "a number >= 0")
        r("b", _finite(self.b) and self.b >= 0, "a number >= 0")
        r("stage_kimg", _finite(self.stage_kimg) and self.stage_kimg >= 0, "a number >= 0 (0 = total / stages)")
        r("stages", _int_in(self.stages, 1, 10_000), "an integer >= 1")
        r("p", _finite(self.p) and self.p >= 0, "a number >= 0")
        r("c", _finite(self.c) and self.c >= 0, "a number >= 0")
        r("ict_s0", _int_in(self.ict_s0, 1, 1 << 20), "an integer >= 1")
        r("ict_s1", _int_in(self.ict_s1, self.ict_s0, 1 << 20), f"an integer >= ict_s0 ({self.ict_s0})")
        r("ict_fixed_n", self.ict_fixed_n == 0 or _int_in(self.ict_fixed_n, 2, 1 << 20), "0 (curriculum) or >= 2")
        r("ict_c_scale", _finite(self.ict_c_scale) and self.ict_c_scale >= 0, "a number >= 0")
        r("sigma_min", _finite(self.sigma_min) and self.sigma_min > 0, "a number > 0")
        r("sigma_max", _finite(self.sigma_max) and self.sigma_max > self.sigma_min, f"a number > sigma_min ({self.sigma_min})")
        r("rho", _finite(self.rho) and self.rho > 0, "a number > 0")
        r("target_guidance", _finite(self.target_guidance) and 0 <= self.target_guidance <= 100,
          "a guidance weight w in [0, 100] (1 = no guidance, the paper's target)")
        r("target_guide", not self.target_guide or self.target_guidance != 1.0,
          "'' unless --objective.target-guidance is not 1 (with w = 1 the guide model would not be used)")


@dataclass(frozen=True)
class OptimConfig(_Validated):
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

    _section = "optim"

    def check(self) -> None:
        r = self._require
        r("lr", _finite(self.lr) and self.lr > 0, "a finite number > 0")
        r("betas", len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        r("eps", _finite(self.eps) and self.eps > 0, "a number > 0 (Adam divides by √v + eps)")
        r("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        r("t_ref_kimg", _finite(self.t_ref_kimg) and self.t_ref_kimg > 0, "a number > 0")
        r("warmup_kimg", _finite(self.warmup_kimg) and self.warmup_kimg >= 0, "a number >= 0")
        r("grad_clip", _finite(self.grad_clip) and self.grad_clip >= 0, "a number >= 0 (0 = off)")


@dataclass(frozen=True)
class EMAConfig(_Validated):
    """Exponential moving average of the weights (REFERENCE §3.7)."""

    kind: Literal["fixed", "halflife", "power"] = "fixed"
    beta: float = 0.9999  # fixed β per optimiser step
    halflife_kimg: float = 500.0  # half-life in images, batch-size independent
    sigma_rels: tuple[float, ...] = (0.05,)  # EDM2 power-function EMA; the first is the one exported

    _section = "ema"

    def check(self) -> None:
        r = self._require
        r("beta", _finite(self.beta) and 0 <= self.beta < 1, "a number in [0, 1)")
        r("halflife_kimg", _finite(self.halflife_kimg) and self.halflife_kimg > 0, "a number > 0")
        # σ_rel of the power-function EMA is √((γ+1)/((γ+2)²(γ+3))), at most √(1/12) ≈ 0.2887 (γ → 0).
        r("sigma_rels", len(self.sigma_rels) > 0 and all(_finite(v) and 0 < v < math.sqrt(1 / 12)
                                                          for v in self.sigma_rels), "numbers in (0, 0.2887)")


@dataclass(frozen=True)
class DataConfig(_Validated):
    """Where the images come from (see ectune.data)."""

    source: Literal["fashion-mnist", "idx", "edm", "torchvision", "latents"] = "fashion-mnist"
    path: str = ""  # directory/file of the data; "" = the source's default location
    name: str = ""  # torchvision dataset class name, e.g. "CIFAR10"
    split: Literal["train", "test"] = "train"
    resolution: int = 0  # pad (centred) to this size; 0 = native size
    use_labels: bool = False
    xflip: bool = False  # random horizontal flips, on the device
    download: bool = False  # torchvision only
    # Latent models (docs/latents.md): the VAE (diffusers AutoencoderKL folder or Hub id) whose latents the network
    # models, and the per-channel raw mean/std normalised to mean 0, std 0.5. "" = the network models pixels.
    vae: str = ""
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()

    _section = "data"

    def check(self) -> None:
        self._require("resolution", _int_in(self.resolution, 0, 4096), "0 (native) or a size in [1, 4096]")
        if self.source == "latents":
            self._require("vae", bool(self.vae), "the VAE the latents were encoded with (their dataset.json names it)")
            self._require("resolution", self.resolution == 0, "0 for data.source latents (latents are never padded)")
        if self.vae:
            n = len(self.latent_mean)
            self._require("latent_mean", n > 0 and all(_finite(m) for m in self.latent_mean),
                          "one finite raw mean per latent channel (EDM2: 5.81 3.25 0.12 -2.15)")
            self._require("latent_std", len(self.latent_std) == n and all(_finite(s) and s > 0 for s in self.latent_std),
                          f"{n} raw stds > 0, one per latent channel (EDM2: 4.17 4.62 3.71 3.28)")


@dataclass(frozen=True)
class SampleConfig(_Validated):
    """Sampling defaults stored with exported models (REFERENCE §5)."""

    t_max: float = 80.0
    mid_t: tuple[float, ...] = (0.821,)  # intermediate times for 2+ step sampling
    heun_steps: int = 18  # EDM Heun: 2*steps - 1 NFE
    sigma_min: float = 0.002
    rho: float = 7.0
    # Boundary of the consistency function at sample time, independent of training's precond.sigma_min_shift:
    # σ_min > 0 samples with the reference code's shifted scalings (its eval mode; 0.003 for the public ECT
    # checkpoints, 0.002 for some), 0 with the exact f(x, 0) = x; None = the training boundary.
    sigma_min_shift: float | None = None

    _section = "sample"

    def check(self) -> None:
        r = self._require
        r("t_max", _finite(self.t_max) and self.t_max > 0, "a number > 0")
        times = (self.t_max, *self.mid_t)
        r("mid_t", all(_finite(v) for v in self.mid_t) and all(a > b for a, b in zip(times, times[1:]))
          and all(v > 0 for v in self.mid_t), f"times strictly decreasing inside (0, t_max = {self.t_max})")
        r("heun_steps", _int_in(self.heun_steps, 1, 10_000), "an integer >= 1")
        r("sigma_min", _finite(self.sigma_min) and 0 < self.sigma_min < self.t_max, "a number in (0, t_max)")
        r("rho", _finite(self.rho) and self.rho > 0, "a number > 0")
        r("sigma_min_shift", self.sigma_min_shift is None or (_finite(self.sigma_min_shift)
                                                              and 0 <= self.sigma_min_shift < self.t_max),
          f"none (the training boundary) or a sampling boundary in [0, t_max = {self.t_max})")


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """What is trained: the image budget, the batch, the seed and the numerics of each step. A run's training state
    is tied to these (and every section but `runtime`); changing one starts a different run."""

    total_kimg: float = 12800.0
    batch: int = 128  # global batch (all ranks, all accumulation rounds)
    accum: int = 1  # gradient accumulation rounds per optimiser step
    seed: int = 0
    # The inner network's precision per step (ectune.precond.resolve_precision): auto = staged on CUDA, fp32 on the
    # CPU; staged = bf16 autocast while the ECT stage's largest r/t is ≤ 0.7, fp32 with TF32 up to 0.96875, fp32
    # beyond: reduced precision's rounding noise would swamp Δ = f(x_t, t) − f(x_r, r) as r/t → 1
    # (docs/performance.md has the measurements).
    precision: Literal["auto", "staged", "fp32", "bf16", "fp16"] = "auto"

    _section = "train"

    def check(self) -> None:
        r = self._require
        r("total_kimg", _finite(self.total_kimg) and self.total_kimg > 0, "a finite number > 0")
        r("batch", _int_in(self.batch, 1, 1 << 24), "an integer >= 1")
        r("accum", _int_in(self.accum, 1, 1 << 24) and self.batch % self.accum == 0,
          f"an integer >= 1 that divides train.batch ({self.batch})")
        r("seed", _int_in(self.seed, 0, 2**63 - 1), "an integer in [0, 2**63)")


@dataclass(frozen=True)
class RuntimeConfig(_Validated):
    """How this invocation runs: device, kernels, reporting and saving. These may change between the invocations that
    resume one run (a resume on another machine, a longer save interval) without changing what is trained."""

    device: str = "auto"
    # CPU threads of torch's kernels; 0 = torch's default (one per core). On a machine whose cores are shared with
    # other work, fewer threads than cores can be several times faster (benchmarks/cpu_speed.py; `ectune demo` times
    # both and picks). The results differ only by float rounding (kernels sum in another order).
    threads: int = 0
    compile: bool = False
    tf32: bool = False  # TF32 for all fp32 convolutions/matmuls on CUDA (it rounds their inputs to 10 mantissa bits)
    # Recompute GroupNorm + SiLU in backward instead of saving the norm output (bit-identical gradients, about a
    # quarter less activation memory for one more element-wise pass): auto = on for eager CUDA training, where
    # memory is the limit; off on the CPU, where the pass costs time; inside torch.compile inductor decides.
    recompute_norms: Literal["auto", "on", "off"] = "auto"
    status_kimg: float = 10.0  # status line interval
    save_kimg: float = 100.0  # training-state + model export interval
    sample_kimg: float = 500.0  # sample-grid interval (0 = off)
    eval_kimg: float = 0.0  # FD evaluation interval (0 = off)
    eval_metric: str = "lite0"
    eval_n: int = 2000
    max_bad_steps: int = 20  # consecutive non-finite steps before stopping
    # Trackers (docs/usage.md#trackers), fed by rank 0 from the records of stats.jsonl and the sample grids.
    tensorboard: bool = False  # event files in RUN/tensorboard (needs ectune[tensorboard])
    wandb: bool = False  # Weights & Biases run named after the run directory (needs ectune[wandb])
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files in RUN/wandb, upload later with `wandb sync`
    wandb_project: str = ""  # "" = the name of the run directory's parent folder
    # Signals that save the training state at the current step and stop (exit code 75; docs/scaling.md#slurm).
    save_on_signal: tuple[str, ...] = ("USR1", "TERM")

    _section = "runtime"

    def check(self) -> None:
        r = self._require
        r("threads", _int_in(self.threads, 0, 1024), "an integer in [0, 1024] (0 = torch's default)")
        for name in ("status_kimg", "save_kimg", "sample_kimg", "eval_kimg"):
            r(name, _finite(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        r("eval_n", _int_in(self.eval_n, 2, 1 << 24), "an integer >= 2 (a covariance needs 2 samples)")
        r("max_bad_steps", _int_in(self.max_bad_steps, 1, 1 << 30), "an integer >= 1")
        r("save_on_signal", signal_names(self.save_on_signal) is not None,
          f"signal names among {', '.join(SAVE_SIGNALS)} (e.g. USR1 TERM or USR1,TERM), or none")


SAVE_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP")


def signal_names(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """--runtime.save-on-signal as names from SAVE_SIGNALS ('SIGUSR1', 'usr1' and 'USR1,TERM' are accepted; 'none'
    or no value: ()), or None if one is not a signal that can save."""
    names = [n.strip().upper().removeprefix("SIG") for v in values for n in str(v).split(",") if n.strip()]
    if names == ["NONE"]:
        return ()
    return tuple(dict.fromkeys(names)) if all(n in SAVE_SIGNALS for n in names) else None


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
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def hyperparameters(self) -> dict[str, Any]:
        """Every section but `runtime`, as JSON-able data: what a run's training state belongs to. Fields added after
        runs were saved (ADDED_FIELDS) are left out while they hold the value that means "as before", so the states
        of those runs keep their hash and resume."""
        out = {k: v for k, v in to_dict(self).items() if k != "runtime"}
        for (section, name), before in ADDED_FIELDS.items():
            if out.get(section, {}).get(name, object()) == before:
                out[section] = {k: v for k, v in out[section].items() if k != name}
        return out


@contextlib.contextmanager
def checks_deferred() -> Any:
    """Build configs without checking them (the CLI parser builds sections before it has every option; tyro would
    turn a check's error into its own message box), then call `check_all` on the result."""
    token = _checks_deferred.set(True)
    try:
        yield
    finally:
        _checks_deferred.reset(token)


def check_all(cfg: RunConfig) -> RunConfig:
    """Check every section of `cfg` (see `_Validated`); returns it unchanged."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Fields whose absence from a stored config means a value other than the field's default: configs written before
# the field existed describe runs that trained that way, so resuming such a run keeps (or refuses to change) it.
ABSENT_FIELD_VALUES: dict[str, dict[str, Any]] = {"ObjectiveConfig": {"loss_form": "weighted_l2"}}
# Fields added after runs were saved, with the JSON value that trains as those runs did (see hyperparameters()).
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("data", "vae"): "", ("data", "latent_mean"): [], ("data", "latent_std"): [],
    ("objective", "target_guidance"): 1.0, ("objective", "target_guide"): "",
}
# Fields that older versions stored and that no longer exist; they changed nothing that was trained.
RETIRED_FIELDS: dict[str, tuple[str, ...]] = {"TrainConfig": ("num_workers",)}
# Fields that older versions stored in another section: (class, old section) -> new section.
MOVED_FIELDS: dict[tuple[str, str], str] = {("RunConfig", "train"): "runtime"}


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output, rejecting unknown fields by name.

    A missing field takes its default, or its entry in ABSENT_FIELD_VALUES."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS.get(cls.__name__, ())}
    data = _with_moved_fields(cls, data)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, where=f"{where}.{name}")
            continue
        value = tuple(value) if isinstance(value, list) else value
        if not _has_type(value, typ):
            raise ValueError(f"{where}.{name}: expected {_type_name(typ)}, got {value!r}")
        kwargs[name] = value
    for name, value in ABSENT_FIELD_VALUES.get(cls.__name__, {}).items():
        kwargs.setdefault(name, value)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own check: say which file it came from
        raise ValueError(f"{where}: {exc}") from None


def _with_moved_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the fields that an older version kept in another section moved to their section (MOVED_FIELDS)."""
    hints = _resolved_types(cls)
    for (owner, old), new in MOVED_FIELDS.items():
        if owner != cls.__name__ or not isinstance(data.get(old), dict):
            continue
        belongs = {f.name for f in dataclasses.fields(hints[new])}
        moving = {k: v for k, v in data[old].items() if k in belongs}
        if moving:
            target = data.get(new, {})
            if not isinstance(target, dict):
                continue  # reported as a type error by the caller
            data = {**data, old: {k: v for k, v in data[old].items() if k not in belongs}, new: {**moving, **target}}
    return data


def _has_type(value: Any, typ: Any) -> bool:
    """Whether JSON-decoded `value` fits the field type `typ` (the types config fields use)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(item_types) == len(value) and all(_has_type(v, t) for v, t in zip(value, item_types))
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is type(None):
        return value is None
    return isinstance(value, typ)


def _type_name(typ: Any) -> str:
    return str(typ).replace("typing.", "") if typing.get_args(typ) else typ.__name__


def _resolved_types(cls: type) -> dict[str, Any]:
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
