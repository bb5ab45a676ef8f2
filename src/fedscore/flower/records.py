"""Between torch tensors and Flower's records (the only conversions the Flower layer does)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor


def tensors_to_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                        for k, v in tensors.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def arrays_to_tensors(record: ArrayRecord, like: dict[str, Tensor] | None = None
                      ) -> dict[str, Tensor]:
    """Tensors from a record; with `like`, checked against its names and shapes and returned
    in its order (a mismatch means server and worker built different models)."""
    out = {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}
    if like is None:
        return out
    if set(out) != set(like) or any(tuple(out[k].shape) != tuple(v.shape)
                                    for k, v in like.items()):
        raise ValueError("the received model does not match this worker's model: check that "
                         "server and SuperNodes run the same fedscore version and config")
    return {k: out[k].to(like[k].dtype) for k in like}
