"""Sparse payloads: a pruned worker sends only what it kept.

Per tensor a worker sends its kept values (in mask order) and either the mask as packed
bits (1 bit per coordinate, 1/32 of a float32 model) or nothing at all when the server can
regenerate the mask from its seed (random masks). A full mask costs no bits. The server
turns replies straight into eq. 8's sums and counts; it never builds a dense copy of a
pruned worker's model.

Arrays are numpy (what Flower's ArrayRecord carries): "values" and "mask", each the
concatenation over tensors in sorted-name order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedscore.errors import FedscoreError

FULL = "full"
BITS = "bits"
SEEDED = "seeded"


def _order(tensors: dict) -> list[str]:
    """The agreed order of tensors in a payload: sorted names (as masks are built)."""
    return sorted(tensors)


def encode(
    params: dict[str, Tensor], masks: dict[str, Tensor], *, seeded: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, mask kinds). arrays["values"]: every tensor's kept values, concatenated in
    sorted-name order; arrays["mask"]: the packed bits of the masks of kind "bits", also
    concatenated (absent when there are none). Two arrays per reply whatever the number of
    tensors: Flower moves every array as its own object, and a U-Net has hundreds."""
    values, bits = [], []
    kinds: dict[str, str] = {}
    for name in _order(params):
        m = masks[name].reshape(-1)
        # on the wire: CPU float32 whatever device or precision the worker trained in
        values.append(params[name].detach().reshape(-1)[m].to("cpu", torch.float32))
        if bool(m.all()):
            kinds[name] = FULL
        elif seeded:
            kinds[name] = SEEDED
        else:
            kinds[name] = BITS
            bits.append(m.cpu())
    arrays = {"values": torch.cat(values).numpy()}
    if bits:
        arrays["mask"] = np.packbits(torch.cat(bits).numpy().astype(np.uint8))
    return arrays, kinds


def decode_masks(
    arrays: dict[str, np.ndarray], kinds: dict[str, str], like: dict[str, Tensor],
    regenerate: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Every tensor's bool mask from a payload (`regenerate` supplies seeded masks)."""
    names = _order(like)
    missing = [k for k in names if k not in kinds]
    if missing:
        raise FedscoreError(f"payload has no mask kind for tensor(s) {missing}")
    n_bits = sum(like[k].numel() for k in names if kinds[k] == BITS)
    flat = (np.unpackbits(arrays["mask"], count=n_bits).astype(bool) if n_bits
            else np.zeros(0, dtype=bool))
    if n_bits and len(flat) != n_bits:
        raise FedscoreError(f"payload mask holds {len(flat)} bits, the model needs {n_bits}")
    masks, at = {}, 0
    for name in names:
        shape = tuple(like[name].shape)
        kind = kinds[name]
        if kind == FULL:
            masks[name] = torch.ones(shape, dtype=torch.bool)
        elif kind == BITS:
            size = like[name].numel()
            masks[name] = torch.from_numpy(flat[at:at + size].copy()).reshape(shape)
            at += size
        elif kind == SEEDED:
            if regenerate is None or name not in regenerate:
                raise FedscoreError(f"payload mask of {name!r} is seeded but no seed was given")
            masks[name] = regenerate[name].reshape(shape)
        else:
            raise FedscoreError(f"payload mask kind {kind!r} of {name!r} is unknown")
    return {k: masks[k] for k in like}


def _kept_values(arrays, masks: dict[str, Tensor], like: dict[str, Tensor]):
    """Split arrays["values"] per tensor (sorted-name order), checking the count."""
    values = torch.from_numpy(np.asarray(arrays["values"]))
    names = _order(like)
    counts = [int(masks[k].sum()) for k in names]
    if values.numel() != sum(counts):
        raise FedscoreError(
            f"payload holds {values.numel()} values but its masks keep {sum(counts)}"
        )
    return dict(zip(names, values.split(counts)))


def decode(
    arrays: dict[str, np.ndarray], kinds: dict[str, str], like: dict[str, Tensor],
    regenerate: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(values scattered into zeros, masks): the worker's sparse model made dense. Used by
    tests and by servers that prefer it; the aggregation path uses `add_to_sums`."""
    masks = decode_masks(arrays, kinds, like, regenerate)
    kept = _kept_values(arrays, masks, like)
    values = {}
    for name, ref in like.items():
        v = torch.zeros(ref.numel(), dtype=ref.dtype)
        v[masks[name].reshape(-1)] = kept[name].to(ref.dtype)
        values[name] = v.reshape(ref.shape)
    return values, masks


def add_to_sums(
    sums: dict[str, Tensor], counts: dict[str, Tensor],
    arrays: dict[str, np.ndarray], kinds: dict[str, str],
    regenerate: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Add one reply into eq. 8's running sums and counts, in place (mergeable statistic);
    returns the reply's masks."""
    masks = decode_masks(arrays, kinds, sums, regenerate)
    add_kept(sums, counts, masks, _kept_values(arrays, masks, sums))
    return masks


def add_kept(sums: dict[str, Tensor], counts: dict[str, Tensor], masks: dict[str, Tensor],
             kept: dict[str, Tensor]) -> None:
    """Eq. 8's running sums and counts plus one worker's kept values (in mask order) at its
    kept coordinates, in place. The transport calls it only with a reply `flower.validate`
    has checked whole, so a bad reply never adds a part of itself."""
    for name in sums:
        m = masks[name].reshape(-1)
        sums[name].view(-1)[m] += kept[name].to(sums[name].dtype)
        counts[name].view(-1)[m] += 1


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes on the wire for a payload's arrays (values + packed masks)."""
    return int(sum(a.nbytes for a in arrays.values()))
