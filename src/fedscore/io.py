"""Files, safely: atomic writes (a reader sees the old file or the new one, never half of
one) and the JSON-lines reader.

The bottom layer of the library (beside errors and cache): runs/ (checkpoints, configs,
metrics.jsonl, reports), metrics/ (the feature-classifier cache) and inference/ all write
through here, so no lower layer has to import runs/ to write a file safely.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedscore.errors import FedscoreError


def out_of_space(err: BaseException) -> bool:
    """Did `err` come from a full disk (ENOSPC, or a quota: EDQUOT)? safetensors' writer
    reports it as a SafetensorError whose text carries the OS error."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text


def no_space(path: str | os.PathLike, kept: str) -> FedscoreError:
    """The one message for a full disk while writing `path`; `kept` says what is intact."""
    return FedscoreError(
        f"no space left on the device while writing {str(path)!r}; {kept}. Free some space "
        "and run again (with --resume to continue a run)"
    )


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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if out_of_space(err):
            kept = (f"the previous {path.name} is intact" if path.is_file()
                    else f"nothing was written to {path.name}")
            raise no_space(path, kept) from None
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
    """The JSON objects of a JSON-lines file (metrics.jsonl), one a line; blank lines skipped.

    A torn LAST line (a process killed mid-append: no final newline and not valid JSON) is
    ignored, so a run killed while logging still reads (`RunFolder.open` cuts it off on
    resume). Any other line that is not a JSON object is one FedscoreError naming the file
    and the line: that is corruption, not a kill."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: the torn tail of a kill
                break
            raise FedscoreError(
                f"{str(path)!r} line {number} is not valid JSON ({line[:60]!r}); the log is "
                "corrupt: restore it from a backup or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise FedscoreError(f"{str(path)!r} line {number} is not a JSON object")
        records.append(record)
    return records


def torn_tail(path: str | os.PathLike) -> int:
    """The number of bytes after the last newline of a JSON-lines file (0: none, or the file
    does not exist): what a kill mid-append leaves."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    return len(data) - (data.rfind(b"\n") + 1)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (json.dumps's rules: NaN is written as NaN;
    callers that need strict JSON clean their objects first)."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
