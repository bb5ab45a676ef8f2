"""Where fedscore keeps what it derives once and reuses: `cache_dir`, else $FEDSCORE_CACHE,
else ~/.cache/fedscore. Only derived files live here (trained feature classifiers, parsed
bundled data); deleting the folder is always safe."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $FEDSCORE_CACHE, else ~/.cache/fedscore."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("FEDSCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedscore"
