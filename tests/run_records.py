"""What tests of real runs share: a run folder's round records, a federated run resumed to
more rounds, and a wait for a condition that another process makes true (a SuperNode's
first round, a log line). Imported
by tests that run federations (tests/ is on sys.path: pytest inserts the root conftest's
folder)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fedscore.io import read_jsonl


def records(folder: Path) -> list[dict]:
    """The round records of run folder `folder` (its metrics.jsonl)."""
    return read_jsonl(folder / "metrics.jsonl")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` every 0.5 s until it holds; fail the test naming `what` after
    `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def resumed_to(cfg, rounds: int):
    """Train federated run `cfg`, then resume it to `rounds` rounds (the rest of the config
    unchanged); returns the resumed run's FederatedResult."""
    from fedscore.runs.federated import train_federated

    train_federated(cfg, progress=False)
    longer = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"rounds": rounds})})
    return train_federated(longer, resume=True, progress=False)
