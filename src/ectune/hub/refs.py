"""`hf://OWNER/NAME[@REVISION]`: a model on the Hugging Face Hub, resolved to a folder of the local hub cache.

Resolution goes through `huggingface_hub.snapshot_download`, so the hub's cache layout, `HF_HUB_CACHE`/`HF_HOME`
and tokens work as in every other hub library. `HF_HUB_OFFLINE=1` is read when a reference is resolved (not when
`huggingface_hub` was imported), and then only the local cache is used: a model downloaded once loads offline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PREFIX = "hf://"
# The files of an ectune Hub folder (`ectune export`); nothing else of a repository is downloaded.
MODEL_FILES = ("model.safetensors", "config.json", "README.md")
# `Path("hf://a/b")` collapses the double slash, and the command-line options are Paths: accept both spellings.
_PREFIX_RE = re.compile(r"^hf:(?:/{1,2}|$)")
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class HubError(ValueError):
    """A bad `hf://` reference, a missing optional dependency or a model the hub (or its cache) cannot give."""


@dataclass(frozen=True)
class HubRef:
    """A model repository on the Hub and the revision (branch, tag or commit) to use; None = the default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(path: Path | str) -> bool:
    return bool(_PREFIX_RE.match(str(path)))


def parse_hub_ref(path: Path | str) -> HubRef | None:
    """The HubRef that `path` names (`hf://OWNER/NAME[@REVISION]`), or None for a local path."""
    text = str(path)
    if not is_hub_ref(text):
        return None
    body = _PREFIX_RE.sub("", text, count=1)
    repo_id, _, revision = body.partition("@")
    if not repo_id or not _REPO_RE.match(repo_id) or ("@" in body and not revision):
        raise HubError(f"{text}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION (a Hub model repository id, "
                       "optionally a branch, tag or commit)")
    return HubRef(repo_id, revision or None)


def require_hub() -> ModuleType:
    """The `huggingface_hub` module, or one clear error saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("this needs the huggingface_hub package: pip install 'ectune[hub]'") from None
    return huggingface_hub


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(ref: HubRef, *, allow_patterns: tuple[str, ...] = MODEL_FILES) -> Path:
    """The local snapshot folder of `ref` (downloaded into the hub cache if needed and allowed)."""
    hub = require_hub()
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        folder = hub.snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline(), allow_patterns=list(allow_patterns), library_name="ectune")
    except RevisionNotFoundError:
        raise HubError(f"{ref}: the repository has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{ref}: no such model repository on the Hub (or it is private: log in with `hf auth login`)") from None
    except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
        where = "HF_HUB_OFFLINE is set and the" if offline() else "the Hub could not be reached and the"
        raise HubError(f"{ref}: {where} local hub cache ({os.environ.get('HF_HUB_CACHE') or 'the default'}) does not "
                       f"hold it ({type(exc).__name__}); download it once online") from None
    return Path(folder)


def resolve_model_path(path: Path | str) -> Path:
    """A local path for a model reference: `hf://...` becomes its snapshot folder in the hub cache; anything else is
    returned as a Path unchanged."""
    ref = parse_hub_ref(path)
    if ref is None:
        return Path(path)
    folder = download(ref)
    if not (folder / "model.safetensors").is_file():
        raise HubError(f"{ref} holds no model.safetensors: it is not an ectune Hub export (a diffusers-format export "
                       "loads with ectune.integrations.diffusers.ECTPipeline.from_pretrained)")
    return folder
