"""A model as one flat vector: the federated package's inner representation.

The update, the masks and eq. 8 then cost a handful of tensor ops per step whatever the
number of parameter tensors (a U-Net has hundreds), and torch.func.grad returns one flat
gradient. Dicts name -> tensor are the interface; `FlatLayout` moves between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fedscore.errors import FedscoreError

Params = dict[str, Tensor]


class FlatLayout:
    """A fixed order of a params dict's tensors, to move between dicts and flat vectors.

    flatten: name -> (*lead, *shape)  ->  (*lead, D);  unflatten: the inverse. `unflatten`
    splits with one `split` op, whose backward is a single concatenation, so gradients
    through it cost O(D), not O(D * number of tensors)."""

    def __init__(self, like: Mapping[str, Tensor]):
        dtypes = {v.dtype for v in like.values()}
        if len(dtypes) != 1:
            raise FedscoreError(
                f"all parameters must share one dtype for federated training, got {dtypes}"
            )
        # sorted names: the same model gives the same layout however its dict was ordered,
        # so tensors sit at the same offsets and kernels round the same way (a resumed run
        # whose checkpoint returns names sorted stays bit-identical)
        self.order = list(like)  # the caller's order, for the dicts handed back
        self.names = sorted(like)
        self.shapes = [tuple(like[k].shape) for k in self.names]
        self.sizes = [like[k].numel() for k in self.names]

    def flatten(self, tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        parts = [tensors[k].reshape(*tensors[k].shape[:batch_dims], -1) for k in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor, copy: bool = False) -> Params:
        lead = tuple(flat.shape[:-1])
        parts = flat.split(self.sizes, dim=-1)
        out = {k: p.reshape(lead + shape) for k, shape, p in zip(self.names, self.shapes, parts)}
        # copies do not share one storage (safetensors refuses tensors that do)
        return {k: out[k].clone() if copy else out[k] for k in self.order}

    def loss(self, loss_fn: Callable[[Params, Any], Tensor]) -> Callable[[Tensor, Any], Tensor]:
        """The loss as a function of the flat vector."""
        return lambda flat, batch: loss_fn(self.unflatten(flat), batch)
