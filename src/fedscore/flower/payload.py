"""Sparse payloads: a pruned worker sends only what it kept.

Per tensor a worker sends its kept values (in mask order) and either the mask as packed
bits (1 bit per coordinate, 1/32 of a float32 model) or nothing at all when the server can
regenerate the mask from its seed (random masks). A full mask costs no bits. The server
turns replies straight into eq. 8's sums and counts; it never builds a dense copy of a
pruned worker's model.

Arrays are numpy (what Flower's ArrayRecord carries); names are "<tensor>/values" and
"<tensor>/mask".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedscore.errors import FedscoreError

FULL = "full"
BITS = "bits"
SEEDED = "seeded"


def encode(
    params: dict[str, Tensor], masks: dict[str, Tensor], *, seeded: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, mask kinds): kept values per tensor plus, unless full or seeded, packed bits."""
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name, value in params.items():
        m = masks[name].reshape(-1)
        flat = value.detach().reshape(-1)
        arrays[f"{name}/values"] = flat[m].cpu().numpy()
        if bool(m.all()):
            kinds[name] = FULL
        elif seeded:
            kinds[name] = SEEDED
        else:
            kinds[name] = BITS
            arrays[f"{name}/mask"] = np.packbits(m.cpu().numpy().astype(np.uint8))
    return arrays, kinds


def decode_mask(
    arrays: dict[str, np.ndarray], kinds: dict[str, str], name: str, shape: tuple[int, ...],
    regenerate: dict[str, Tensor] | None = None,
) -> Tensor:
    """The bool mask of tensor `name` from a payload (`regenerate` supplies seeded masks)."""
    numel = int(np.prod(shape)) if shape else 1
    kind = kinds.get(name)
    if kind == FULL:
        return torch.ones(shape, dtype=torch.bool)
    if kind == BITS:
        bits = np.unpackbits(arrays[f"{name}/mask"], count=numel).astype(bool)
        return torch.from_numpy(bits).reshape(shape)
    if kind == SEEDED:
        if regenerate is None or name not in regenerate:
            raise FedscoreError(f"payload mask of {name!r} is seeded but no seed was given")
        return regenerate[name]
    raise FedscoreError(f"payload has no mask kind for tensor {name!r}")


def decode(
    arrays: dict[str, np.ndarray], kinds: dict[str, str], like: dict[str, Tensor],
    regenerate: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(values scattered into zeros, masks): the worker's sparse model made dense. Used by
    tests and by servers that prefer it; the aggregation path uses `add_to_sums`."""
    values, masks = {}, {}
    for name, ref in like.items():
        m = decode_mask(arrays, kinds, name, tuple(ref.shape), regenerate)
        v = torch.zeros(ref.numel(), dtype=ref.dtype)
        kept = torch.from_numpy(np.asarray(arrays[f"{name}/values"])).to(ref.dtype)
        if kept.numel() != int(m.sum()):
            raise FedscoreError(
                f"payload for {name!r} holds {kept.numel()} values but its mask keeps "
                f"{int(m.sum())}"
            )
        v[m.reshape(-1)] = kept
        values[name], masks[name] = v.reshape(ref.shape), m
    return values, masks


def add_to_sums(
    sums: dict[str, Tensor], counts: dict[str, Tensor],
    arrays: dict[str, np.ndarray], kinds: dict[str, str],
    regenerate: dict[str, Tensor] | None = None,
) -> None:
    """Add one reply into eq. 8's running sums and counts, in place (mergeable statistic)."""
    for name in sums:
        m = decode_mask(arrays, kinds, name, tuple(sums[name].shape), regenerate).reshape(-1)
        kept = torch.from_numpy(np.asarray(arrays[f"{name}/values"])).to(sums[name].dtype)
        flat = sums[name].view(-1)
        flat[m] += kept
        counts[name].view(-1)[m] += 1


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes on the wire for a payload's arrays (values + packed masks)."""
    return int(sum(a.nbytes for a in arrays.values()))
