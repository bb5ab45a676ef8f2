"""Eq. 7, a worker's local training on its pruned sub-model, as pure functions.

    theta_{q,n,0} = theta_q ⊙ m_{q,n}                      (pruned coordinates are ZERO)
    theta_{q,n,s} = theta_{q,n,s-1} - eta * grad f_n(theta_{q,n,s-1}, xi_{n,s-1}) ⊙ m_{q,n}   (7)

`sgd` is eq. 7 exactly (the theory's update). `adam` is the practical variant: Adam's moments
are fed the MASKED gradient and the update itself is masked, so a pruned coordinate stays
exactly zero even when its moments still carry momentum from an earlier round (state kept
across rounds) — the moments of pruned coordinates simply decay as under a zero gradient.

Adam is written out by hand (a few lines with bias correction) instead of torch.optim.Adam
because torch.optim is stateful and mutates parameters in place: it cannot update N workers
stacked on one axis, nor run under torch.func.vmap. `apply_update` is THE one
implementation of the update; `local_update` (the sequential engine, a Flower client) applies
it to one worker, the in-process engine to all workers stacked.

Inside, a model is one flat vector (`FlatLayout`): the update and the masks then cost a
handful of tensor ops per step whatever the number of parameter tensors (a U-Net has
hundreds), and torch.func.grad returns one flat gradient. Dicts name -> tensor are the
interface; flat vectors never leave the federated package.

A loss is `loss_fn(params, batch) -> scalar` where batch already holds the data AND the
pre-drawn noise (t, eps): randomness is drawn outside, per worker, with explicit generators,
so vectorised and sequential paths see identical noise. `make_loss_fn` builds one from a
model through torch.func.functional_call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedscore.errors import FedscoreError, unknown

Params = dict[str, Tensor]
Batch = Any  # a tensor, or a tuple / list / dict of tensors (nested), leading axes indexed
LossFn = Callable[[Params, Batch], Tensor]
OPTIMIZERS = ("sgd", "adam")


def make_loss_fn(
    model: nn.Module, loss: Callable[[Callable[..., Tensor], Batch], Tensor]
) -> LossFn:
    """loss_fn(params, batch) = loss(net, batch), with net(*args) = model(*args) evaluated at
    `params` via functional_call (no copy of the model; works under vmap and grad).

    Example: make_loss_fn(model, lambda net, b: dsm_loss(lambda x, t: net(x, t, b[1]),
    b[0], b[2], b[3])) for a batch (x0, y, t, eps)."""

    def loss_fn(params: Params, batch: Batch) -> Tensor:
        def net(*args: Tensor) -> Tensor:
            return functional_call(model, params, args)

        return loss(net, batch)

    return loss_fn


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

    def loss(self, loss_fn: LossFn) -> Callable[[Tensor, Batch], Tensor]:
        """The loss as a function of the flat vector."""
        return lambda flat, batch: loss_fn(self.unflatten(flat), batch)

    def state_to_flat(self, state: dict | None, batch_dims: int = 0) -> dict:
        if not state:
            return {}
        return {"m": self.flatten(state["m"], batch_dims),
                "v": self.flatten(state["v"], batch_dims), "step": state["step"]}

    def state_from_flat(self, state: dict) -> dict | None:
        if not state:
            return None
        return {"m": self.unflatten(state["m"], copy=True),
                "v": self.unflatten(state["v"], copy=True), "step": state["step"].clone()}


def init_opt_state(params: Params, optimizer: str) -> dict | None:
    """Fresh optimiser state for one worker: None for sgd; zero moments, step 0 for adam.
    Adam's state is {"m": name -> shape, "v": name -> shape, "step": 0-d int64}; stacked for
    N workers every tensor gains a leading N axis ("step": (N,))."""
    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        return None
    first = next(iter(params.values()))
    return {
        "m": {k: torch.zeros_like(v) for k, v in params.items()},
        "v": {k: torch.zeros_like(v) for k, v in params.items()},
        "step": torch.zeros((), dtype=torch.long, device=first.device),
    }


def apply_update(
    theta: Tensor,
    grad: Tensor,
    mask: Tensor,
    state: dict,
    *,
    lr: float,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, dict]:
    """One update of eq. 7 (or masked Adam) on flat vectors: (theta, state).

    theta, grad: (*lead, D); mask: bool, same shape; state: {} for sgd, {"m", "v": (*lead, D),
    "step": (*lead,)} for adam. Elementwise, so lead = () is one worker and lead = (N,) is
    all workers stacked, each with its own step count.
    """
    # where, not multiply: a non-finite gradient at a pruned coordinate must not leak in
    g = torch.where(mask, grad, 0)
    if optimizer == "sgd":
        return theta - lr * g, state
    if optimizer != "adam":
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    b1, b2 = betas
    step = state["step"] + 1
    m = b1 * state["m"] + (1 - b1) * g
    v = b2 * state["v"] + (1 - b2) * g * g
    t = step.to(theta.dtype).unsqueeze(-1)  # (*lead, 1): bias correction per worker
    update = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    theta = theta - torch.where(mask, update, 0)  # masked update: pruned stay exactly 0
    return theta, {"m": m, "v": v, "step": step}


def autograd_grad(loss_flat: Callable, theta: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """(grad, loss) of one worker by plain reverse-mode autograd on a leaf copy of theta: the
    gradient torch.func.grad computes, at about half its overhead when not vectorised."""
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_flat(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad, loss.detach()


def index_batch(batch: Batch, index) -> Batch:
    """batch[index] on every tensor of a (nested) tuple / list / dict of tensors."""
    if isinstance(batch, Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: index_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(index_batch(v, index) for v in batch)
    if batch is None:
        return None
    raise FedscoreError(
        f"batches must be tensors or tuples/lists/dicts of tensors, got {type(batch).__name__}"
    )


def leading_size(batch: Batch, axis: int = 0) -> int:
    """Size of axis `axis` shared by every tensor of a batch pytree."""
    if isinstance(batch, Tensor):
        return batch.shape[axis]
    leaves = batch.values() if isinstance(batch, dict) else batch
    sizes = {leading_size(v, axis) for v in leaves if v is not None}
    if len(sizes) != 1:
        raise FedscoreError(f"batch tensors disagree on the size of axis {axis}: {sizes}")
    return sizes.pop()


def check_steps(steps: int | None, available: int) -> int:
    if steps is None:
        return available
    if not 1 <= steps <= available:
        raise FedscoreError(
            f"steps must be between 1 and the {available} pre-drawn batches, got {steps}"
        )
    return int(steps)


def local_update(
    params: Params,
    mask: dict[str, Tensor],
    batches: Batch,
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int | None = None,
    optimizer: str = "sgd",
    opt_state: dict | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, dict | None, Tensor]:
    """Eq. 7 for one worker: start at theta_q ⊙ m, take S steps; (theta_{q,n,S}, state, losses).

    params: theta_q (name -> shape); mask: bool, same shapes; batches: a pytree whose tensors
    have a leading axis of at least S pre-drawn batches (data and noise), batch s = [s];
    opt_state: this worker's Adam state to continue (`init_opt_state`'s format), or None
    for a fresh one (sgd: ignored, None returned); losses: (S,), the loss at each step
    before its update.
    """
    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    steps = check_steps(steps, leading_size(batches))
    layout = FlatLayout(params)
    with torch.no_grad():  # the update builds no graph; autograd_grad enables it locally
        m = layout.flatten(mask)
        theta = torch.where(m, layout.flatten(params).detach(), 0)
        if optimizer == "sgd":
            state = {}
        else:
            state = layout.state_to_flat(opt_state or init_opt_state(params, optimizer))
        loss_flat = layout.loss(loss_fn)
        losses = []
        for s in range(steps):
            grad, loss = autograd_grad(loss_flat, theta, index_batch(batches, s))
            theta, state = apply_update(theta, grad, m, state, lr=lr, optimizer=optimizer,
                                        betas=betas, eps=eps)
            losses.append(loss)
    return layout.unflatten(theta, copy=True), layout.state_from_flat(state), torch.stack(losses)
