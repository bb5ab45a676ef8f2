"""Runs are folders (DESIGN principle 10): config.yaml, env.json, metrics.jsonl,
checkpoints, samples, plots and report.md. Anything a report shows is rebuilt from here."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

import fedscore
from fedscore.config import RunConfig, dump_config
from fedscore.errors import FedscoreError
from fedscore.io import atomic_write_json, atomic_write_text, read_jsonl
from fedscore.runtime import Runtime

CHECKPOINT = "checkpoint.safetensors"


def versions() -> dict[str, str]:
    """Versions of what a run's numbers depend on."""
    return {
        "fedscore": fedscore.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


@dataclass
class RunFolder:
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def open(cls, cfg: RunConfig, *, resume: bool = False, path: Path | None = None,
             runtime: Runtime | None = None) -> RunFolder:
        """Create (or, with resume, reopen) the run folder and write config + versions
        (env.json, with the device and precision of `runtime` when given).

        A folder that already holds a checkpoint is never overwritten without --resume."""
        folder = cls(Path(path) if path is not None else cfg.run_dir())
        if resume:
            if not folder.checkpoint.is_file():
                raise FedscoreError(
                    f"cannot resume: {str(folder.checkpoint)!r} does not exist (start the run "
                    "without --resume)"
                )
        elif folder.checkpoint.is_file() or folder.metrics_path.is_file():
            raise FedscoreError(
                f"{str(folder.path)!r} already holds a run; pass --resume to continue it, or "
                "choose another name (--set name=...) or --out folder"
            )
        folder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder.path / "config.yaml", dump_config(cfg))
        env = versions()
        if runtime is not None:
            env["runtime"] = runtime.environment()
        atomic_write_json(folder.path / "env.json", env)
        return folder

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, key: str, last: int) -> None:
        """Drop records logged after the checkpoint being resumed (they will be redone)."""
        kept = [r for r in self.metrics() if r.get(key, -1) <= last]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, obj)
        return path
