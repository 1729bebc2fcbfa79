"""The run directory: resolved config, training state, model exports, logs and samples.

Rerunning the same command resumes; a config that conflicts with the stored one is refused, naming the fields.
One process owns a run directory at a time (the lock file `lock` names it); a lock left by a process that no
longer runs on this host is taken over.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

from ..config import RunConfig, RuntimeConfig, diff, from_dict, to_dict
from ..runtime.checkpoint import atomic_write_text, read_model_meta


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.json"
        self.state = root / "state.pt"
        self.model = root / "model.safetensors"
        self.samples = root / "samples"
        self.lock = root / "lock"

    def trained_anything(self) -> bool:
        return self.state.exists() or self.model.exists()

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
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.acquire_lock()
            self.remove_stale_temporaries()
        stored = self.stored_config()
        if stored is not None and not self.trained_anything():
            stored = None  # a start that failed before its first save (e.g. a typo in --data.path) binds nothing
        if stored is not None:
            conflicts = diff(replace(cfg, runtime=stored.runtime), stored)  # the runtime section may change
            if conflicts:
                raise ValueError(
                    f"{self.root} already holds a run with a different config; refusing to mix them. Differing fields:\n  "
                    + "\n  ".join(conflicts) + "\nUse the same options to resume, or a new --run directory."
                )
            return cfg
        if is_main:
            record = {"command": command, "init": None if init is None else str(init), "config": to_dict(cfg)}
            atomic_write_text(self.config, json.dumps(record, indent=2))
        return cfg

    def acquire_lock(self) -> None:
        """Take the run directory for this process, or refuse naming its holder. A lock whose process is gone
        (same host, pid no longer running) is taken over with a note; one from another host is never guessed."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        # Written whole under another name, then hard-linked: the lock never exists half-written, and the link
        # fails if another process holds it.
        mine = self.root / f".lock.{me['pid']}.tmp"
        mine.write_text(json.dumps(me))
        try:
            while True:
                try:
                    os.link(mine, self.lock)
                    break
                except FileExistsError:
                    holder = self._lock_holder()
                    if holder == me:
                        return  # this process already owns it (a second train() call in one process)
                    if holder is not None and (holder["host"] != me["host"] or _pid_alive(holder["pid"])):
                        raise ValueError(
                            f"run directory {self.root} is in use by process {holder['pid']} on {holder['host']} "
                            f"(lock file {self.lock}); wait for it to finish, or delete the lock file if it is not "
                            "running") from None
                    who = "it is unreadable" if holder is None else f"process {holder['pid']} no longer runs"
                    print(f"note: taking over {self.lock} ({who})", file=sys.stderr)
                    self.lock.unlink(missing_ok=True)
        finally:
            mine.unlink(missing_ok=True)
        atexit.register(self.lock.unlink, missing_ok=True)

    def release_lock(self) -> None:
        if self._lock_holder() == {"pid": os.getpid(), "host": socket.gethostname()}:
            self.lock.unlink(missing_ok=True)

    def _lock_holder(self) -> dict | None:
        try:
            holder = json.loads(self.lock.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # half-written or foreign: treated as stale

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a save that was killed (`atomic_write` names them `.<name>.<random>.tmp`)."""
        for folder in (self.root, self.samples):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)

    @staticmethod
    def config_hash(cfg: RunConfig) -> str:
        """What a training state is tied to: the config without its runtime section, which may change on resume."""
        return _hash(cfg.hyperparameters())

    @staticmethod
    def belongs_to(state_hash: str, cfg: RunConfig) -> bool:
        """Whether a training state with `state_hash` was saved by a run of `cfg`. States saved before the runtime
        settings had their own section hashed them inside `train`, at their defaults; those resume too."""
        legacy = cfg.hyperparameters()
        runtime = to_dict(RuntimeConfig())
        legacy["train"] = {**legacy["train"], **{k: runtime[k] for k in _RUNTIME_FIELDS_IN_TRAIN}}
        return state_hash in (RunDir.config_hash(cfg), _hash(legacy))


# The runtime settings that configs kept in `train` before `runtime` was a section (hashed there at their defaults).
_RUNTIME_FIELDS_IN_TRAIN = ("status_kimg", "save_kimg", "sample_kimg", "eval_kimg", "eval_metric", "eval_n", "device",
                            "compile", "tf32", "recompute_norms", "max_bad_steps")


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def adopt_init_architecture(cfg: RunConfig, init: Path) -> RunConfig:
    """Tuning keeps the pretrained network's architecture; only its regularisation (dropout, checkpointing) and the
    data/precond settings come from the run's config. Mismatched σ_data is refused."""
    init_cfg, _ = read_model_meta(init)
    net = replace(init_cfg.net, dropout=cfg.net.dropout, dropout_res=cfg.net.dropout_res, checkpointing=cfg.net.checkpointing)
    if init_cfg.precond.sigma_data != cfg.precond.sigma_data:
        raise ValueError(f"--init {init} was trained with sigma_data={init_cfg.precond.sigma_data}, "
                         f"this run uses {cfg.precond.sigma_data}")
    latents = lambda d: (d.vae, tuple(d.latent_mean), tuple(d.latent_std))  # noqa: E731
    if latents(init_cfg.data) != latents(cfg.data):
        raise ValueError(f"--init {init} models latents {latents(init_cfg.data)} (VAE, raw mean, raw std; '' = pixels), "
                         f"this run's data are {latents(cfg.data)}; set --data.vae/--data.latent-mean/--data.latent-std")
    return replace(cfg, net=net)
