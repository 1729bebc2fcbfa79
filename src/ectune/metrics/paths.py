"""Where ectune keeps files it can recompute or re-download: reference statistics and extractor weights."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$ECTUNE_CACHE if set, else ~/.cache/ectune."""
    env = os.environ.get("ECTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ectune"
