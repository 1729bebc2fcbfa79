"""What the command modules share: parsing a command's options dataclass with tyro, and small helpers.

Each command's options are one frozen dataclass; its field docstrings are the `--help` text. tyro spells a field
`until_kimg` as `--until-kimg`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Sequence, TypeVar

import tyro

from ..config import RunConfig, checks_deferred, to_dict

T = TypeVar("T")

# A switch that is off unless given (`--force`), without tyro's `--no-force` twin; config fields keep their pairs.
Flag = Annotated[bool, tyro.conf.FlagCreatePairsOff]


def optional(metavar: str, *, unset: str) -> Any:
    """tyro settings of an option whose default None means `unset` ("the model's"): `--help` shows
    `--mid-t T` ... `(default: the model's)` instead of `{None}|FLOAT` ... `(default: None)`."""
    return tyro.conf.arg(metavar=metavar, help_behavior_hint=f"(default: {unset})")


def parse(cls: type[T], command: str, argv: Sequence[str], *, default: T | None = None) -> T:
    """The options of `ectune COMMAND`. Usage errors (unknown option, unparsable value) exit with tyro's message
    and code 2; config sections are built unchecked (tyro would box a check's message), so call their `check`."""
    with checks_deferred():
        if default is None:
            return tyro.cli(cls, args=list(argv), prog=f"ectune {command}")
        return tyro.cli(cls, args=list(argv), prog=f"ectune {command}", default=default)


def parse_known(cls: type[T], argv: Sequence[str]) -> tuple[T, list[str]]:
    """A first pass for options that choose the defaults of others (`--preset`): the options `cls` knows, with
    its own defaults, and the arguments it does not know (`--help` is left to the full `parse`)."""
    without_help = [a for a in argv if a not in ("-h", "--help")]
    with checks_deferred():
        return tyro.cli(cls, args=without_help, return_unknown_args=True)


def describe(cfg: RunConfig, **extra: object) -> dict[str, Any]:
    """`extra`, the parameter count and the config as JSON-able data (`info`, and `--dry-run` of training)."""
    import torch

    from ..nets import build_net, count_params

    with torch.device("meta"):
        params = count_params(build_net(cfg.net))
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()}, "params": params,
            "params_millions": round(params / 1e6, 1), "config": to_dict(cfg)}


def with_sampling_boundary(cfg: RunConfig, sigma_min_shift: float | None) -> RunConfig:
    """cfg with a --sigma-min-shift given on the command line as its sampling boundary (None: unchanged)."""
    if sigma_min_shift is None:
        return cfg
    return replace(cfg, sample=replace(cfg.sample, sigma_min_shift=sigma_min_shift))


def check_mid_t(mid_t: tuple[float, ...] | None, cfg: RunConfig) -> None:
    """Refuse a --mid-t that is empty or not strictly decreasing inside (0, t_max) (None: the model's own)."""
    if mid_t is None:
        return
    try:
        if not mid_t:  # tyro lets `--mid-t` end without a value
            raise ValueError
        replace(cfg.sample, mid_t=mid_t)
    except ValueError:
        raise ValueError(f"--mid-t {' '.join(map(str, mid_t)) or '(none)'}: expected times strictly decreasing inside "
                         f"(0, t_max = {cfg.sample.t_max})") from None
