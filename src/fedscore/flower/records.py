"""Between torch tensors and Flower's records (the only conversions the Flower layer does)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def flat_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """A model as ONE array (tensors concatenated in sorted-name order). Flower moves each
    array as a separate object with its own hash and request: a 200-tensor U-Net sent as 200
    arrays made a loopback round take ~80 s instead of ~10."""
    flat = torch.cat([tensors[k].detach().reshape(-1).cpu() for k in sorted(tensors)])
    return ArrayRecord({"flat": Array(flat.numpy())})


def from_flat_record(record: ArrayRecord, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `flat_record`, shaped, typed and placed (device) like `like` (a
    mismatch means server and worker built different models)."""
    flat = torch.from_numpy(np.array(record["flat"].numpy()))
    names = sorted(like)
    sizes = [like[k].numel() for k in names]
    if flat.numel() != sum(sizes):
        raise ValueError(f"the received model has {flat.numel()} parameters, this worker's "
                         f"has {sum(sizes)}: check that server and SuperNodes run the same "
                         "fedscore version and config")
    parts = dict(zip(names, flat.split(sizes)))
    return {k: parts[k].reshape(like[k].shape).to(like[k].device, like[k].dtype, copy=True)
            for k in like}
