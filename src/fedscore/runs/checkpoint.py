"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without
executing code.

Tensors (model, EMA, optimiser moments, RNG states) go in the safetensors body; the small
JSON state (step or round, optimiser hyper-parameters, anything else) goes in its metadata,
so one file is the whole checkpoint and one rename publishes it: a crash leaves either the
old checkpoint or the new one, never half of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.io import atomic_write

STATE_KEY = "fedscore_state"


def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write tensors + JSON-able state to `path` (a .safetensors file) atomically."""
    body = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {STATE_KEY: json.dumps(state)}
    atomic_write(Path(path), lambda tmp: save_file(body, tmp, metadata=meta))


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) from a checkpoint; a missing, truncated or foreign file is one
    FedscoreError that says so, and nothing on disk is touched."""
    path = Path(path)
    if not path.is_file():
        raise FedscoreError(f"no checkpoint at {str(path)!r}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise FedscoreError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({err}); restore it from a "
            "backup or start the run again without --resume"
        ) from None
    if STATE_KEY not in meta:
        raise FedscoreError(f"{str(path)!r} is a safetensors file but not a fedscore checkpoint")
    return tensors, json.loads(meta[STATE_KEY])


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    head = f"{prefix}/"
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def generator_state(g: torch.Generator) -> Tensor:
    return g.get_state()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimiser's state_dict split into tensors (per-parameter state) and JSON (groups)."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{pid}/{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
