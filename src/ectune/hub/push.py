"""`ectune push`: upload an exported folder to a Hub model repository (creating the repository if needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .refs import _REPO_RE, HubError, require_hub


def is_export_folder(path: Path) -> bool:
    """An `ectune export` folder (either format), as opposed to a run directory or a model file."""
    return path.is_dir() and (path / "README.md").is_file() and (
        (path / "model_index.json").is_file() or _hub_config_library(path / "config.json") == "ectune")


def _hub_config_library(path: Path) -> str | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("library_name") if isinstance(data, dict) else None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str | None = None, token: str | None = None) -> Any:
    """Create `repo_id` (a model repository; kept if it exists) and upload every file of `folder` in one commit."""
    if not _REPO_RE.match(repo_id) or "/" not in repo_id:
        raise HubError(f"--repo {repo_id!r}: expected a Hub repository id OWNER/NAME")
    hub = require_hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=message or f"Upload {folder.name} with ectune")
