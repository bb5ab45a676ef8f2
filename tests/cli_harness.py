"""`fedscore ARGS` through the CLI's entry point, in the test's process: what a shell sees
(exit code, stdout, stderr), where typer's CliRunner would hand back the exception
instead of `main()`'s one-line message. Imported by tests that check that message (tests/
is on sys.path: pytest inserts the root conftest's folder)."""

from __future__ import annotations

import sys
from pathlib import Path

from fedscore.cli import main


def run_main(monkeypatch, capsys, cwd: Path | None, *args: str):
    """(exit code, stdout, stderr) of `fedscore ARGS`, run from `cwd` (None: where the test
    is)."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fedscore", *args])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err
