"""Files, safely: atomic writes (a reader sees the old file or the new one, never half of
one) and the JSON-lines reader.

The bottom layer of the library (beside errors and cache): runs/ (checkpoints, configs,
metrics.jsonl, reports), metrics/ (the feature-classifier cache) and inference/ all write
through here, so no lower layer has to import runs/ to write a file safely.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, rename it over
    `path`, fsync the folder. If `write` raises, the temporary file is removed and `path`
    is left as it was (a crash mid-write loses the new file, never the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder's entry is on disk
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (metrics.jsonl), one a line; blank lines skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (json.dumps's rules: NaN is written as NaN;
    callers that need strict JSON clean their objects first)."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
