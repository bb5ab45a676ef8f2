"""Runs are folders (DESIGN principle 10): config.yaml, env.json, metrics.jsonl,
checkpoints, samples, plots and report.md. Anything a report shows is rebuilt from here.

A run folder is also a small state machine (docs/reliability.md, "Run folders and
checkpoints"), recorded in `state.json` (written atomically):

    fresh (no state.json) -> running -> finished | failed
    running / failed, no checkpoint (killed or failed before its first one) -> a fresh run
        starts over; --resume says there is nothing to resume
    running / failed with a checkpoint -> --resume continues it
    finished -> refused, except --resume with more train.steps / federation.rounds

One writer at a time: `open` takes an exclusive `fcntl.flock` on `<folder>/.lock`, held for
the run's life (the kernel drops it when the process dies, so a stale lock of a killed run
never blocks the next one). `guard()` marks the folder finished or failed (with the reason)
and releases the lock. A resume is checked whole before anything is written: the config
against config.yaml (only SAFE_CHANGES may differ), the checkpoint against its checksums
and state schema, metrics.jsonl against the number of records the checkpoint saw.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

import fedscore
from fedscore.config import RunConfig, dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.io import atomic_write_json, atomic_write_text, no_space, out_of_space, read_jsonl
from fedscore.runs import checkpoint as ckpt
from fedscore.runtime import Runtime

CHECKPOINT = "checkpoint.safetensors"
STATE = "state.json"
LOCK = ".lock"
STATES = ("running", "finished", "failed")
OWN_FILES = (CHECKPOINT, "model.safetensors", "metrics.jsonl", "config.yaml", "env.json",
             STATE, "runtime.json", "partition.json", "flower.json")
"""Files fedscore writes atomically here: their `.<name>.*.tmp` leftovers of a kill are
removed when the folder is opened (under the lock, so never a live writer's)."""
RUN_FILES = ("config.yaml", "model.safetensors", "metrics.jsonl")
"""What marks a folder as holding a run's results: never overwritten without asking."""

SAFE_CHANGES = (
    "name", "out_dir",  # where the folder lives (it may have been moved)
    "device", "precision",  # where and how the network runs
    "train.lr", "federation.lr",  # lowering lr after a divergence is the documented recovery
    "train.log_every", "train.checkpoint_every", "federation.eval_every",  # cadence
    "federation.strategy",  # how the in-process engine batches the workers (same eqs. 7-8)
    "federation.max_update_norm",  # a defence may be switched on mid-run
    "data.data_root", "data.download",  # where the same dataset is read from
    "sample", "theory",  # sampling after training; measurements on their own seed stream
)
"""Config fields a resume may change (the rest must equal config.yaml's)."""
GROWING = {"train.steps": "step", "federation.rounds": "round"}
"""Fields a resume may raise (not below the checkpoint's position): more steps or rounds."""


def versions() -> dict[str, str]:
    """Versions of what a run's numbers depend on."""
    return {
        "fedscore": fedscore.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dump as {"train.lr": ..., "model.options.hidden": ...}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def changed_fields(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted config fields whose value differs: name -> (old, new); a section that appears
    or disappears (`federation: none` <-> a section) is one entry for the section."""
    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return {k: v for k, v in diff.items()
            if not any(k.startswith(p + ".") for p in diff if p != k)}


def safe_change(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_CHANGES)


@dataclass
class RunFolder:
    path: Path
    token: str | None = None
    """This process's run token (state.json "token"): lets a launcher tell the state its
    own run wrote from one a previous run left (`flower.run`)."""
    good_checkpoint: int | None = None
    """Step / round of the last checkpoint known to hold finite weights (written or loaded
    by this process); None: none yet (a divergence message says so)."""
    records: int = 0
    """metrics.jsonl records logged so far (saved in each checkpoint's state)."""
    config: RunConfig | None = None
    """The config this run was opened with (None for a folder only read)."""
    _lock: Any = field(default=None, repr=False, compare=False)
    _loaded: Any = field(default=None, repr=False, compare=False)
    _run_info: dict = field(default_factory=dict, repr=False, compare=False)
    _pending: Any = field(default=None, repr=False, compare=False)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @classmethod
    def open(cls, cfg: RunConfig, *, resume: bool = False, path: Path | None = None,
             runtime: Runtime | None = None, token: str | None = None) -> RunFolder:
        """Create (or, with resume, reopen) the run folder, lock it, check it may be
        (re)used, then write config + versions (env.json, with the device and precision of
        `runtime` when given) and state "running". Every refusal is one FedscoreError and
        leaves the folder as it was.

        A folder that already holds a checkpoint is never overwritten without --resume; one
        holding a run's files but no state.json and no checkpoint is never overwritten."""
        folder = cls(Path(path) if path is not None else cfg.run_dir(), token=token,
                     config=cfg)
        if resume and not folder.path.is_dir():
            raise FedscoreError(f"cannot resume: {str(folder.path)!r} does not exist (start "
                                "the run without --resume)")
        folder.path.mkdir(parents=True, exist_ok=True)
        folder._acquire()
        try:
            folder._remove_temp_files()
            prior = folder.state()
            if resume:
                folder._check_resume(cfg, prior)
            else:
                folder._check_fresh(prior)
            env = versions()
            if runtime is not None:
                env["runtime"] = runtime.environment()
            folder._pending = (dump_config(cfg), env)
            if not resume:  # every check passed: only now do the run's files change
                folder.confirm()
            folder._write_state("running", resumed=resume,
                                previous=(prior or {}).get("state"))
        except BaseException:
            folder.release()
            raise
        return folder

    def confirm(self) -> None:
        """Write config.yaml and env.json. A resume calls this once its checkpoint is
        restored (model, optimiser, generator), so a resume that fails at any point leaves
        config.yaml describing the checkpoint's run."""
        if self._pending is not None:
            text, env = self._pending
            atomic_write_text(self.path / "config.yaml", text)
            atomic_write_json(self.path / "env.json", env)
            self._pending = None

    # ------------------------------------------------------------ state and lock

    def state(self) -> dict[str, Any] | None:
        """state.json's content (None: no state.json); a malformed one is a FedscoreError."""
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("state") not in STATES:
            raise FedscoreError(
                f"{str(self.state_path)!r} is not a fedscore run state (it is written "
                "atomically, so something else wrote it); remove it only if no run is using "
                "this folder")
        return state

    def _write_state(self, state: str, reason: str | None = None, **run_info: Any) -> None:
        """state.json, atomically: `run_info` (resumed, previous) is given when the run
        starts and kept in every later write of this run."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if state == "running":
            self._run_info = {"started": now, **run_info}
        atomic_write_json(self.state_path, {
            "state": state, "reason": reason, "pid": os.getpid(), "host": socket.gethostname(),
            "token": self.token, **self._run_info, "updated": now})

    def _acquire(self) -> None:
        """The exclusive lock for this run's life (fcntl.flock: dropped by the kernel when
        the process dies, however it dies)."""
        lock = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            holder = ""
            with contextlib.suppress(FedscoreError):
                s = self.state() or {}
                holder = f" (pid {s.get('pid')} on {s.get('host')}, since {s.get('started')})"
            raise FedscoreError(
                f"{str(self.path)!r} is in use by another fedscore run{holder}; wait for it to "
                "end, or choose another name (--set name=...) or --out folder") from None
        self._lock = lock

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def finish(self) -> None:
        self.confirm()
        self._write_state("finished")
        self.release()

    def fail(self, reason: str) -> None:
        """Record the failure; a failure to record it (a full disk) never hides the
        original error."""
        try:
            self._write_state("failed", reason)
        except (OSError, FedscoreError):
            pass
        finally:
            self.release()

    @contextlib.contextmanager
    def guard(self):
        """Run the body as this folder's run: finished when it returns, failed (with the
        reason) when it raises; the lock is released either way."""
        try:
            yield self
        except KeyboardInterrupt:
            self.fail("interrupted")
            raise
        except BaseException as err:
            self.fail(str(err) if isinstance(err, FedscoreError)
                      else f"{type(err).__name__}: {err}")
            raise
        else:
            self.finish()

    def _remove_temp_files(self) -> None:
        for name in OWN_FILES:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------ the rules

    def _check_fresh(self, prior: dict | None) -> None:
        where = repr(str(self.path))
        if self.checkpoint.is_file():
            if prior and prior["state"] == "finished":
                raise FedscoreError(
                    f"{where} holds a finished run; to continue it with more steps or rounds "
                    "raise train.steps / federation.rounds and pass --resume, or choose another "
                    "name (--set name=...) or --out folder")
            raise FedscoreError(
                f"{where} already holds a run; pass --resume to continue it, or choose another "
                "name (--set name=...) or --out folder")
        found = [n for n in RUN_FILES if (self.path / n).exists()]
        if "model.safetensors" in found:
            raise FedscoreError(
                f"{where} holds a trained model.safetensors but no checkpoint; it is never "
                "overwritten: move it away, or choose another name (--set name=...) or --out")
        if found and prior is None:
            raise FedscoreError(
                f"{where} holds {', '.join(found)} of a run fedscore is not tracking (no "
                f"{STATE}, no checkpoint); it is never overwritten: choose another name "
                "(--set name=...) or --out folder, or remove those files")
        # ours, stopped before its first checkpoint (we hold the lock: its writer is gone):
        # start over, without the dead run's partial log
        self.metrics_path.unlink(missing_ok=True)

    def _check_resume(self, cfg: RunConfig, prior: dict | None) -> None:
        where = repr(str(self.path))
        if not self.checkpoint.is_file():
            if prior is not None:
                raise FedscoreError(
                    f"cannot resume {where}: its run stopped ({prior['state']}) before its "
                    "first checkpoint, so there is nothing to resume; start it again without "
                    "--resume (that replaces its partial log)")
            raise FedscoreError(f"cannot resume: {str(self.checkpoint)!r} does not exist "
                                "(start the run without --resume)")
        self._check_config(cfg)
        federated = cfg.federation != "none"
        key = "round" if federated else "step"
        tensors, state = ckpt.load_checkpoint(
            self.checkpoint, schema=ckpt.FEDERATED_STATE if federated else ckpt.CENTRAL_STATE)
        if bad := ckpt.nonfinite(tensors):
            raise FedscoreError(
                f"checkpoint {str(self.checkpoint)!r} holds non-finite weights ({bad[0]!r}, "
                f"...): it cannot be resumed; start the run again without --resume")
        at = state[key]
        target = cfg.federation.rounds if federated else cfg.train.steps
        field_name = "federation.rounds" if federated else "train.steps"
        if target < at:
            raise FedscoreError(
                f"cannot resume {where}: its checkpoint is at {key} {at} but {field_name} is "
                f"{target}; {field_name} may only grow on resume")
        if target == at and prior is not None and prior["state"] == "finished":
            raise FedscoreError(
                f"{where} holds a finished run ({field_name} = {at}); nothing to resume. To "
                f"continue it raise {field_name} and pass --resume, or choose another name "
                "(--set name=...) or --out folder")
        self._check_metrics(key, at, state.get("log_records"))
        self._loaded = (tensors, state)
        self.good_checkpoint = at

    def _check_config(self, cfg: RunConfig) -> None:
        stored_path = self.path / "config.yaml"
        if not stored_path.is_file():
            raise FedscoreError(
                f"cannot resume {str(self.path)!r}: its config.yaml is missing, so the config "
                "cannot be checked against the checkpoint; restore it")
        stored = load_config(stored_path)
        diff = changed_fields(stored, cfg)
        unsafe = {k: v for k, v in diff.items() if not safe_change(k) and k not in GROWING}
        if unsafe:
            named = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in unsafe.items())
            raise FedscoreError(
                f"cannot resume {str(self.path)!r}: this config does not fit its checkpoint; "
                f"changed: {named}. A resume "
                f"may change only {', '.join(GROWING)} (more) and {', '.join(SAFE_CHANGES)}; "
                "start a new run (another name or --out) to change the rest; config.yaml is "
                "left as it was")

    def _check_metrics(self, key: str, at: int, logged: Any) -> None:
        """metrics.jsonl must hold the records the checkpoint saw (a torn last line is fine:
        it is cut off when the log is truncated to the checkpoint)."""
        if not isinstance(logged, int) or logged <= 0:
            return  # a checkpoint from before records were counted, or nothing logged yet
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size == 0:
            return  # emptied on purpose: the documented way to accept the lost records
        if not self.metrics_path.is_file():
            raise FedscoreError(
                f"cannot resume {str(self.path)!r}: metrics.jsonl is missing but the checkpoint "
                f"({key} {at}) was written after {logged} record(s); restore it, or create an "
                "empty metrics.jsonl to resume with the earlier records lost")
        kept = [r for r in self.metrics() if _position(r, key) <= at]
        if len(kept) < logged:
            raise FedscoreError(
                f"cannot resume {str(self.path)!r}: metrics.jsonl holds {len(kept)} record(s) "
                f"up to {key} {at} but the checkpoint was written after {logged}; restore it, or "
                "create an empty metrics.jsonl to resume with the earlier records lost")

    # ------------------------------------------------------------ checkpoint and log

    def read_checkpoint(self, schema: dict[str, Any] | None = None):
        """(tensors, state) of the checkpoint: the one `open(resume=True)` verified, else
        loaded (and verified) now."""
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            return loaded
        return ckpt.load_checkpoint(self.checkpoint, schema=schema)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (a kill mid-append leaves a torn last
        line, which readers skip and a resume cuts off)."""
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:
            if out_of_space(err):
                raise no_space(self.metrics_path, "the checkpoint is intact (a torn last "
                               "line of the log is cut off on resume)") from None
            raise
        self.records += 1

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, key: str, last: int) -> None:
        """Drop records logged after the checkpoint being resumed (they will be redone) and
        a torn last line."""
        kept = [r for r in self.metrics() if _position(r, key) <= last]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = len(kept)

    def recovery(self, key: str, setting: str) -> str:
        """The end of a divergence message: the checkpoint that really is good (verified
        finite when written or loaded), or that there is none and how to start over;
        `setting` is the learning rate to lower ("train.lr")."""
        value: Any = self.config
        for part in setting.split("."):
            value = getattr(value, part, None)
        if self.good_checkpoint is None:
            return (f"There is no good checkpoint to resume from: start the run again without "
                    f"--resume, with a lower {setting} (now {value})")
        return (f"The last good checkpoint ({key} {self.good_checkpoint}, verified finite) is "
                f"kept in {str(self.checkpoint)!r}; lower {setting} (now {value}) and resume "
                "with --resume")

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, obj)
        return path


def _position(record: dict, key: str) -> int:
    value = record.get(key, -1)
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
