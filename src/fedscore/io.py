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


def _umask() -> int:
    """The process's umask. Linux reports it in /proc (read without changing it); elsewhere
    it is set and restored at once (os.umask is the only way to read it there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions `path` gets: those it has when it exists (a file its owner made
    private stays private), else what open() would give a new file (0o666 less the umask).
    mkstemp's 0o600 would leave a run's outputs unreadable to the team that shares them."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, rename it over
    `path`, fsync the folder; the file gets a new file's permissions (the umask's) or keeps
    those of the file it replaces. If `write` raises, the temporary file is removed and `path`
    is left as it was (a crash mid-write loses the new file, never the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after the write: a writer may replace the file, and a kept
        # read-only mode would refuse the write
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
