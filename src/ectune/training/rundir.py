"""The run directory: resolved config, training state, model exports, logs and samples.

Rerunning the same command resumes; a config that conflicts with the stored one is refused, naming the fields.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..config import RunConfig, diff, from_dict, to_dict
from ..runtime.checkpoint import atomic_write_text, read_model_meta

# Fields that may change between invocations of one run without changing what is trained.
RUNTIME_FIELDS = ("status_kimg", "save_kimg", "sample_kimg", "eval_kimg", "eval_metric", "eval_n", "num_workers",
                  "device", "compile", "tf32", "recompute_norms", "max_bad_steps")


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.json"
        self.state = root / "state.pt"
        self.model = root / "model.safetensors"
        self.samples = root / "samples"

    def stored_config(self) -> RunConfig | None:
        if not self.config.exists():
            return None
        try:
            data = json.loads(self.config.read_text())
            return from_dict(RunConfig, data["config"], where=str(self.config))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.config} is not an ectune run config ({exc}); use a new --run directory") from exc

    def prepare(self, cfg: RunConfig, *, init: Path | str | None, command: str, is_main: bool) -> RunConfig:
        """Resolve the config for this run (adopting an --init model's architecture) and record it."""
        if init is not None:
            cfg = adopt_init_architecture(cfg, Path(init))
        stored = self.stored_config()
        if stored is not None:
            given = replace(cfg, train=replace(cfg.train, **{k: getattr(stored.train, k) for k in RUNTIME_FIELDS}))
            conflicts = diff(given, stored)
            if conflicts:
                raise ValueError(
                    f"{self.root} already holds a run with a different config; refusing to mix them. Differing fields:\n  "
                    + "\n  ".join(conflicts) + "\nUse the same options to resume, or a new --run directory."
                )
            return replace(cfg, train=replace(stored.train, **{k: getattr(cfg.train, k) for k in RUNTIME_FIELDS}))
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            record = {"command": command, "init": None if init is None else str(init), "config": to_dict(cfg)}
            atomic_write_text(self.config, json.dumps(record, indent=2))
        return cfg


def adopt_init_architecture(cfg: RunConfig, init: Path) -> RunConfig:
    """Tuning keeps the pretrained network's architecture; only its regularisation (dropout, checkpointing) and the
    data/precond settings come from the run's config. Mismatched σ_data is refused."""
    init_cfg, _ = read_model_meta(init)
    net = replace(init_cfg.net, dropout=cfg.net.dropout, dropout_res=cfg.net.dropout_res, checkpointing=cfg.net.checkpointing)
    if init_cfg.precond.sigma_data != cfg.precond.sigma_data:
        raise ValueError(f"--init {init} was trained with sigma_data={init_cfg.precond.sigma_data}, "
                         f"this run uses {cfg.precond.sigma_data}")
    return replace(cfg, net=net)
