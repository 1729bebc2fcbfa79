"""Checkpoints are data, not code.

- Model exports: safetensors files whose metadata holds the full config (JSON) and the sampler defaults;
  loaded strictly into a network built from that config.
- Training state: a torch file of tensors and plain values, always read with `torch.load(weights_only=True)`.
- Every file is written atomically (temporary file in the same folder, fsync, rename), so a crash or a full
  disk leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import torch
from safetensors.torch import load_file, safe_open, save

from ..config import RunConfig, from_dict, to_dict

FORMAT = "ectune-model-v1"


class CheckpointError(ValueError):
    """A model or state file that cannot be used: names the file and what was expected."""


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through `write(fileobj)` so that readers see either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the permissions open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; the previous file (if any) is unchanged") from exc
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _check_safetensors_header(path: Path) -> None:
    """Refuse anything that is not a safetensors file before any parser touches it (pickles included)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) == 9 and 0 < header_len <= size - 8 and head[8:9] == b"{":
        return
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a pickle/zip checkpoint, not an ectune model: ectune never unpickles user files "
            "(for public EDM/EDM2 pickles use `ectune import-edm`)"
        )
    raise CheckpointError(f"{path} is not a safetensors file (bad header; truncated or another format)")


def _tensors_in(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in nested dicts and lists (a training state)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_in(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_in(v, f"{prefix}.{i}")


def nonfinite_tensors(obj: Any) -> list[str]:
    """Names of the floating tensors in `obj` (a tensor dict or a nested state) that hold NaN or inf."""
    return [name for name, t in _tensors_in(obj) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _refuse_nonfinite(obj: Any, path: Path | str, what: str) -> None:
    bad = nonfinite_tensors(obj)
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise CheckpointError(f"{path}: {what} holds NaN or inf ({shown})")


def save_model(path: Path | str, state_dict: dict[str, torch.Tensor], cfg: RunConfig, *, extra: dict[str, Any] | None = None) -> None:
    """Export network weights as safetensors with the config and sampler defaults in the metadata.
    Non-finite weights are never written: the previous file stays."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _refuse_nonfinite(tensors, path, "refusing to write weights that")
    meta = {
        "format": FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "sampler": json.dumps(to_dict(cfg.sample)),
        "extra": json.dumps(extra or {}),
    }
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def read_model_meta(path: Path | str) -> tuple[RunConfig, dict[str, Any]]:
    """Config and extra metadata of an exported model, without loading the weights."""
    path = _model_file(path)
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type (name varies by version)
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an ectune model (metadata 'format' != {FORMAT!r})")
    try:
        cfg = from_dict(RunConfig, json.loads(meta["config"]), where=f"{path} config")
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt ectune metadata ({exc})") from exc
    return cfg, extra


def load_model_weights(path: Path | str) -> dict[str, torch.Tensor]:
    path = _model_file(path)
    read_model_meta(path)
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({exc}); the file may be truncated") from exc
    _refuse_nonfinite(weights, path, "refusing to use it: the model")
    return weights


def _model_file(path: Path | str) -> Path:
    """A model file, or the model.safetensors inside a run directory (or inside an `hf://` reference's folder)."""
    from ..hub.refs import resolve_model_path  # `hf://OWNER/NAME[@REVISION]` -> its folder in the hub cache

    path = resolve_model_path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no ectune model at {path} (expected a .safetensors file or a run directory holding model.safetensors)")
    return path


def save_state(path: Path | str, state: dict[str, Any]) -> None:
    """Training state (tensors, numbers, strings, nested dicts/lists), atomically; never with NaN or inf."""
    _refuse_nonfinite(state, path, "refusing to write a training state that")
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: Path | str, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A training state written by `save_state`, holding at least the `required` keys."""
    path = Path(path)
    advice = "delete it to restart from the last model export, or restore it"
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # empty or truncated file, foreign pickle rejected by weights_only, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable ectune training state ({type(exc).__name__}{': ' + reason if reason else ''}); "
            + advice) from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete training state (missing {', '.join(missing)}); {advice}")
    _refuse_nonfinite(state, path, "cannot resume: the training state")
    return state

