"""Eq. 7, a worker's local training on its pruned sub-model, as pure functions.

    theta_{q,n,0} = theta_q ⊙ m_{q,n}                      (pruned coordinates are ZERO)
    theta_{q,n,s} = theta_{q,n,s-1} - eta * grad f_n(theta_{q,n,s-1}, xi_{n,s-1}) ⊙ m_{q,n}   (7)

The step itself is an `Optimizer` (`federated.optim`): `SGD` is eq. 7 exactly, `Adam` the
masked practical variant. `opt.update` is THE one implementation of the step;
`local_update` (the sequential engine, a Flower client) applies it to one worker, the
in-process engine to all workers stacked.

Inside, a model is one flat vector (`flat.FlatLayout`), and so is the optimiser's state;
`local_update` takes and returns params as dicts name -> tensor and the state flat
(`optim.state_to_tensors` names it for files).

A loss is `loss_fn(params, batch) -> scalar` where batch already holds the data AND its
noise (t, eps): randomness is drawn outside, per worker and step, with explicit
generators, so vectorised and sequential paths see identical noise. Batches come as a
pytree of tensors pre-drawn (S, B, ...) (stacked (N, S, B, ...) in the engine), or as a
`batches.RoundBatches` that draws each (worker, step) only when the step takes it.
`make_loss_fn` builds a loss from a model through torch.func.functional_call.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedscore.errors import FedscoreError
from fedscore.federated.batches import LazyBatches
from fedscore.federated.flat import FlatLayout
from fedscore.federated.optim import Optimizer, State, check_state

Params = dict[str, Tensor]
Batch = Any  # a tensor, a tuple / list / dict of tensors (nested), or a LazyBatches
LossFn = Callable[[Params, Batch], Tensor]


class PrivateGrad(Protocol):
    """A step's gradient under DP-SGD (`privacy.DPSGD`): (gradient, loss) of the flat loss
    at theta (D,) or stacked (n, D), on a batch, with the worker's mask, at local step s."""

    def grad(self, loss_flat: Callable, theta: Tensor, batch: Batch, mask: Tensor,
             step: int) -> tuple[Tensor, Tensor]: ...

    def select(self, rows: int | slice) -> PrivateGrad: ...


def thread_replicas(model: nn.Module) -> Callable[[], nn.Module]:
    """A getter of the module the calling thread may run: `model` itself in the thread that
    made the getter, a private deep copy (made once per thread) in any other. functional_call
    swaps a module's parameters while it runs, so two threads must never share one module;
    the engine's "threads" strategy trains workers in a pool of threads."""
    owner = threading.get_ident()
    local = threading.local()

    def get() -> nn.Module:
        if threading.get_ident() == owner:
            return model
        if not hasattr(local, "model"):
            local.model = copy.deepcopy(model)
        return local.model

    return get


def make_loss_fn(
    model: nn.Module, loss: Callable[[Callable[..., Tensor], Batch], Tensor]
) -> LossFn:
    """loss_fn(params, batch) = loss(net, batch), with net(*args) = model(*args) evaluated at
    `params` via functional_call (no copy of the model; works under vmap and grad; another
    thread runs its own copy, `thread_replicas`).

    Example: make_loss_fn(model, lambda net, b: dsm_loss(lambda x, t: net(x, t, b[1]),
    b[0], b[2], b[3])) for a batch (x0, y, t, eps)."""
    module = thread_replicas(model)

    def loss_fn(params: Params, batch: Batch) -> Tensor:
        def net(*args: Tensor) -> Tensor:
            return functional_call(module(), params, args)

        return loss(net, batch)

    return loss_fn


def autograd_grad(loss_flat: Callable, theta: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """(grad, loss) of one worker by plain reverse-mode autograd on a leaf copy of theta: the
    gradient torch.func.grad computes, at about half its overhead when not vectorised."""
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_flat(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad, loss.detach()


def index_batch(batch: Batch, index) -> Batch:
    """batch[index] on every tensor of a (nested) tuple / list / dict of tensors; a
    `LazyBatches` draws what the index names (one step), nothing more."""
    if isinstance(batch, Tensor | LazyBatches):
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
    """Size of axis `axis` shared by every tensor of a batch pytree (or of a LazyBatches)."""
    if isinstance(batch, Tensor):
        return batch.shape[axis]
    if isinstance(batch, LazyBatches):
        return batch.leading_size(axis)
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
            f"steps must be between 1 and the {available} batches available, got {steps}"
        )
    return int(steps)


def local_update(
    params: Params,
    mask: dict[str, Tensor],
    batches: Batch,
    loss_fn: LossFn,
    opt: Optimizer,
    *,
    steps: int | None = None,
    state: State | None = None,
    dp: PrivateGrad | None = None,
) -> tuple[Params, State, Tensor]:
    """Eq. 7 for one worker: start at theta_q ⊙ m, take S steps of `opt`;
    (theta_{q,n,S}, state, losses).

    params: theta_q (name -> shape); mask: bool, same shapes; batches: a pytree whose tensors
    have a leading axis of at least S pre-drawn batches (data and noise), batch s = [s], or
    a worker's `batches.WorkerBatches` (batch s drawn when step s takes it);
    state: this worker's flat optimiser state to continue ({"m", "v": (D,), "step": ()} for
    Adam), or None / {} for a fresh one; returned in the same format ({} for SGD).
    dp: DP-SGD's gradient for this worker (`privacy.DPSGD`, mode sample): each step takes
    its clipped, noised per-sample gradient instead of the batch gradient; None: plain eq. 7.
    losses: (S,), the loss at each step before its update.
    """
    steps = check_steps(steps, leading_size(batches))
    layout = FlatLayout(params)
    with torch.no_grad():  # the update builds no graph; autograd_grad enables it locally
        m = layout.flatten(mask)
        theta = torch.where(m, layout.flatten(params).detach(), 0)
        if state:
            check_state(opt, state, theta)
        else:
            state = opt.init(theta)
        loss_flat = layout.loss(loss_fn)
        losses = []
        for s in range(steps):
            batch = index_batch(batches, s)
            if dp is None:
                grad, loss = autograd_grad(loss_flat, theta, batch)
            else:
                grad, loss = dp.grad(loss_flat, theta, batch, m, s)
            theta, state = opt.update(theta, grad, m, state)
            losses.append(loss)
    return layout.unflatten(theta, copy=True), state, torch.stack(losses)
