"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without
executing code.

Tensors (model, EMA, optimiser moments, RNG states) go in the safetensors body; the small
JSON state (step or round, optimiser hyper-parameters, anything else) goes in its metadata,
so one file is the whole checkpoint and one rename publishes it: a crash leaves either the
old checkpoint or the new one, never half of each.

Integrity: the metadata also holds a BLAKE2b digest of every tensor's bytes
(`fedscore_checksums`), checked on every load, so a flipped byte in the body is "checkpoint
is corrupt", never a silently different model. Checkpoints written before the digests
existed still load (there is nothing to check them against; `verified` says so).
"""

from __future__ import annotations

import hashlib
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
CHECKSUMS_KEY = "fedscore_checksums"
CENTRAL_STATE = {"step": int, "optimizer": dict}
"""What a centralised run's checkpoint state must hold (runs/train.py writes it)."""
FEDERATED_STATE = {"round": int, "gamma_star": (int, type(None))}
"""What a federated run's checkpoint state must hold (runs/federated.py writes it)."""


def digest(t: Tensor) -> str:
    """BLAKE2b (128-bit) of a CPU tensor's bytes, as stored (any dtype, 0-d included)."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write tensors + JSON-able state + each tensor's digest to `path` (a .safetensors
    file) atomically."""
    body = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {STATE_KEY: json.dumps(state),
            CHECKSUMS_KEY: json.dumps({k: digest(v) for k, v in body.items()})}
    atomic_write(Path(path), lambda tmp: save_file(body, tmp, metadata=meta))


def corrupt(path: Path, why: str) -> FedscoreError:
    return FedscoreError(
        f"checkpoint {str(path)!r} is corrupt ({why}); restore it from a backup or start the "
        "run again without --resume"
    )


def load_checkpoint(path: Path, *, schema: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) from a checkpoint; a missing, truncated, corrupt (a tensor that does
    not match its digest) or foreign file, or a state that does not fit `schema` (key ->
    type or tuple of types, as for isinstance), is one FedscoreError that says so, and
    nothing on disk is touched."""
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
    verify(path, tensors, meta)
    try:
        state = json.loads(meta[STATE_KEY])
    except ValueError:
        raise corrupt(path, "its state metadata is not JSON") from None
    check_state(path, state, schema or {})
    return tensors, state


def verify(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> bool:
    """Check every tensor against its stored digest; False when the checkpoint predates
    digests (nothing to check), a FedscoreError when anything differs."""
    if CHECKSUMS_KEY not in meta:
        return False
    try:
        sums = json.loads(meta[CHECKSUMS_KEY])
    except ValueError:
        sums = None
    if not isinstance(sums, dict):
        raise corrupt(path, "its checksum metadata is not a JSON object")
    if set(sums) != set(tensors):
        raise corrupt(path, f"tensors {sorted(set(sums) ^ set(tensors))[:5]} are missing or "
                            "extra")
    bad = [k for k, t in tensors.items() if digest(t) != sums[k]]
    if bad:
        raise corrupt(path, f"{len(bad)} tensor(s) do not match their checksum, e.g. "
                            f"{bad[0]!r}")
    return True


def check_state(path: Path, state: Any, schema: dict[str, Any]) -> None:
    """The state metadata is a JSON object holding each key of `schema` with its type (bool
    is never an int); else one FedscoreError naming the key."""
    if not isinstance(state, dict):
        raise corrupt(path, "its state metadata is not a JSON object")
    for key, kinds in schema.items():
        if key not in state:
            raise corrupt(path, f"its state metadata lacks {key!r}")
        value = state[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise corrupt(path, f"its state {key!r} is {value!r}, not {names}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise corrupt(path, f"its state {key!r} is negative ({value})")


def nonfinite(tensors: dict[str, Tensor], prefixes: tuple[str, ...] = ("model/", "ema/")
           ) -> list[str]:
    """Names of the floating tensors under `prefixes` that hold a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if k.startswith(prefixes) and v.is_floating_point() and not torch.isfinite(v).all()]


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
    """Load an optimiser's state back; a state that does not fit (keys, groups, shapes) is a
    ValueError for the caller to name its checkpoint in."""
    state: dict[int, dict[str, Tensor]] = {}
    try:
        for key, value in tensors.items():
            pid, name = key.split("/", 1)
            state.setdefault(int(pid), {})[name] = value
        groups = meta["param_groups"]
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise ValueError(f"its optimiser state does not fit this model ({err!r})") from None
