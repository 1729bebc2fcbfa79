"""The training state of a run: checking the data against the network, restoring (or initialising) weights,
optimiser and EMA, and saving them with the model exports."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig
from ..data import ImageDataset
from ..ema import EMA
from ..runtime.checkpoint import CheckpointError, load_state, save_model, save_state
from .rundir import RunDir


def check_data_matches(cfg: RunConfig, data: ImageDataset, *, world_size: int = 1) -> None:
    """The network's image shape and label count must match the data (one clear error otherwise)."""
    net = cfg.net
    if data.channels != net.img_channels or data.resolution != net.img_resolution:
        raise ValueError(
            f"data {data.description} has {data.channels}×{data.resolution}×{data.resolution} images but the network "
            f"expects {net.img_channels}×{net.img_resolution}×{net.img_resolution} (set --data.resolution to pad, "
            "or use a model/preset made for this data)"
        )
    if net.label_dim and (data.labels is None or data.num_classes != net.label_dim):
        have = "no labels" if data.labels is None else f"{data.num_classes} classes"
        raise ValueError(f"the network is conditioned on {net.label_dim} classes but {data.description} has {have} "
                         "(set --data.use-labels, or --net.label-dim 0 for an unconditional model)")
    B, accum = cfg.train.batch, cfg.train.accum
    if B % (accum * world_size):
        raise ValueError(f"--train.batch {B} must be divisible by --train.accum × processes = {accum} × {world_size}")


def restore(run: RunDir, cfg: RunConfig, *, net: nn.Module, opt: torch.optim.Optimizer, ema: EMA,
            init: Path | str | None) -> tuple[int, int]:
    """Resume from the run's training state, or start from `init` weights, or from scratch. Returns (nimg, skipped).

    A new start normalises EDM2's weights before the first step (see below); a resume loads them as saved."""
    if run.state.exists():
        state = load_state(run.state, required=("net", "opt", "ema", "nimg", "skipped"))
        if not run.belongs_to(state.get("config_hash", run.config_hash(cfg)), cfg):
            raise CheckpointError(f"{run.state} belongs to another run (its config differs from {run.config}); "
                                  "move it away or use the run directory it came from")
        net.load_state_dict(state["net"], strict=True)
        opt.load_state_dict(state["opt"])
        ema.load_state(state["ema"])
        return int(state["nimg"]), int(state["skipped"])
    if init is not None:
        from ..model import load_model  # local: only needed when tuning

        init_model, _, _ = load_model(init)
        net.load_state_dict(init_model.net.state_dict(), strict=True)
    # EDM2's forced weight normalisation (no-op for DDPM++) before the first step, not only after each one: the
    # reference normalises inside every student pass, so its first step already starts from unit-RMS rows, which
    # imported weights (EDM2's post-hoc EMAs) and a fresh init do not have. The forward pass uses normalised weights
    # either way, but a row of RMS s gets 1/s times the gradient, and an update of a given size turns it 1/s times
    # as far, so the first step would differ. A resumed state was saved normalised, and normalising again is not a
    # no-op (w/(ε + RMS)), so a resume skips this and stays bit-exact.
    net.normalize_weights_()
    for avg in ema.averages:  # the averages start from the weights the first step starts from, not a random net
        torch._foreach_copy_(avg, [v.float() for k, v in net.state_dict().items() if k in ema.names])
    return 0, 0


def freeze_unused_parameters(net: nn.Module) -> None:
    """Stop tracking gradients of parameters the training pass never uses, so DDP does not wait for them.

    DDPM++'s augmentation-label mapping (augment_dim > 0, as in the public EDM CIFAR-10 checkpoints) only runs when
    augmentation labels are passed, which ECT never does; DDP would otherwise fail on the second step with
    "Expected to have finished reduction in the prior iteration". The optimiser skips these parameters either way
    (their gradient stays None), so one process and N processes still train identically.
    """
    map_augment = getattr(net, "map_augment", None)
    if isinstance(map_augment, nn.Module):
        map_augment.requires_grad_(False)


def save_checkpoint(run: RunDir, cfg: RunConfig, *, net: nn.Module, opt: torch.optim.Optimizer, ema: EMA,
                    nimg: int, skipped: int, is_main: bool) -> None:
    if not is_main:
        return
    save_state(run.state, {"net": net.state_dict(), "opt": opt.state_dict(), "ema": ema.to_state(),
                           "nimg": nimg, "skipped": skipped, "config_hash": run.config_hash(cfg)})
    extra = {"nimg": nimg, "objective": cfg.objective.kind}
    for i, label in enumerate(ema.labels):
        path = run.model if i == 0 else run.root / f"model-{label}.safetensors"
        save_model(path, ema.state_dict(i), cfg, extra={**extra, "ema": label})
