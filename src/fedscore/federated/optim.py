"""The local optimiser of eq. 7 as a small spec: `init` + `update` on flat vectors (fedjax's
shape of an algorithm).

    theta_{q,n,s} = theta_{q,n,s-1} - eta * grad f_n(theta_{q,n,s-1}, xi_{n,s-1}) ⊙ m_{q,n}   (7)

`SGD` is eq. 7 exactly (the theory's update). `Adam` is the practical variant: its moments
are fed the MASKED gradient and the update itself is masked, so a pruned coordinate stays
exactly zero even when its moments still carry momentum from an earlier round (state kept
across rounds); the moments of pruned coordinates simply decay as under a zero gradient.

An optimiser works on flat vectors theta, grad: (*lead, D) with a bool mask of the same shape,
elementwise, so ONE implementation serves one worker (lead = ()), N workers stacked on a
leading axis (lead = (N,)), and runs under torch.func.vmap. Its state is ONE shape: a dict
of flat tensors with the worker axis leading when stacked,

    SGD:  {}
    Adam: {"m": (*lead, D), "v": (*lead, D), "step": (*lead,) int64}

and `state_to_tensors` / `state_from_tensors` are the single place where it becomes a dict
keyed by parameter name ("m/<name>", "v/<name>", "step"), for checkpoint files and Flower
records; nothing else outside the engine needs to know D's order.

Adam is written out by hand (a few lines with bias correction) instead of torch.optim.Adam
because torch.optim is stateful and mutates parameters in place: it cannot update N workers
stacked on one axis, nor run under torch.func.vmap, nor hand its state back as a value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown
from fedscore.federated.flat import FlatLayout

State = dict[str, Tensor]
# state entries with one value per coordinate (flat (*lead, D)); every other entry is one
# value per worker (*lead,)
PER_COORDINATE = ("m", "v")


class Optimizer(Protocol):
    """What eq. 7's local update needs from an optimiser; pure functions of flat tensors."""

    lr: float

    def init(self, theta: Tensor) -> State:
        """A fresh state for theta (*lead, D): one per worker on the leading axes."""
        ...

    def update(self, theta: Tensor, grad: Tensor, mask: Tensor, state: State
               ) -> tuple[Tensor, State]:
        """One step: (theta', state'). theta, grad: (*lead, D); mask: bool, same shape."""
        ...


@dataclass(frozen=True)
class SGD:
    """Eq. 7 exactly: theta - lr * grad ⊙ m. Stateless."""

    lr: float

    def init(self, theta: Tensor) -> State:
        return {}

    def update(self, theta: Tensor, grad: Tensor, mask: Tensor, state: State
               ) -> tuple[Tensor, State]:
        # where, not multiply: a non-finite gradient at a pruned coordinate must not leak in
        return theta - self.lr * torch.where(mask, grad, 0), state


@dataclass(frozen=True)
class Adam:
    """Masked Adam: moments of the masked gradient, masked update (module docstring).
    Each worker has its own step count, so bias correction is per worker."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, theta: Tensor) -> State:
        return {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta),
                "step": torch.zeros(theta.shape[:-1], dtype=torch.long, device=theta.device)}

    def update(self, theta: Tensor, grad: Tensor, mask: Tensor, state: State
               ) -> tuple[Tensor, State]:
        g = torch.where(mask, grad, 0)  # moments see the masked gradient of eq. 7
        b1, b2 = self.betas
        step = state["step"] + 1
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        t = step.to(theta.dtype).unsqueeze(-1)  # (*lead, 1): bias correction per worker
        update = self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        theta = theta - torch.where(mask, update, 0)  # masked update: pruned stay exactly 0
        return theta, {"m": m, "v": v, "step": step}


OPTIMIZERS: dict[str, type] = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, *, lr: float, **options) -> Optimizer:
    """OPTIMIZERS[name](lr=lr, **options), e.g. make_optimizer("adam", lr=1e-4, betas=(0.9,
    0.99)); unknown names and options an optimiser does not take are refused."""
    if name not in OPTIMIZERS:
        raise unknown("optimizer", name, OPTIMIZERS)
    cls = OPTIMIZERS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(options) - fields)
    if extra:
        raise FedscoreError(
            f"optimizer {name!r} takes no option(s) {', '.join(extra)}; it takes "
            f"{', '.join(sorted(fields))}"
        )
    return cls(lr=lr, **options)


def check_state(opt: Optimizer, state: State, theta: Tensor) -> None:
    """Refuse a state that is not `opt`'s for theta (*lead, D): a checkpoint of another
    optimiser, another model, or another number of workers."""
    want = opt.init(theta[..., :0])  # the keys and per-worker shapes at no cost
    if set(state) != set(want):
        raise FedscoreError(
            f"optimiser state has entries {sorted(state)} but {type(opt).__name__} keeps "
            f"{sorted(want)}: was it saved by another optimiser?"
        )
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise FedscoreError(
                f"optimiser state {k!r} is a {type(v).__name__}, not a flat tensor; a state "
                "keyed by parameter name is converted by federated.state_from_tensors"
            )
        shape = theta.shape if k in PER_COORDINATE else want[k].shape
        if v.shape != shape:
            raise FedscoreError(
                f"optimiser state {k!r} has shape {tuple(v.shape)}, expected {tuple(shape)} "
                "(another model or number of workers?)"
            )


def state_to_tensors(state: State, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state as tensors keyed by parameter name, for checkpoints and Flower records:
    {"m/<name>": (*lead, *shape), "v/<name>": ..., "step": (*lead,)}; {} for SGD.
    like: the model's params (name -> shape), fixing the flat layout."""
    if not state:
        return {}
    layout = FlatLayout(like)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in PER_COORDINATE:
            out |= {f"{key}/{k}": v for k, v in layout.unflatten(value, copy=True).items()}
        else:
            out[key] = value.clone()
    return out


def state_from_tensors(tensors: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> State:
    """The inverse of `state_to_tensors` (also reads checkpoints written before the spec:
    the same keys)."""
    if not tensors:
        return {}
    layout = FlatLayout(like)
    state: State = {}
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        head, sep, name = key.partition("/")
        if sep and head in PER_COORDINATE:
            grouped.setdefault(head, {})[name] = value
        else:
            state[key] = value
    for head, named in grouped.items():
        if set(named) != set(layout.names):
            odd = sorted(set(named) ^ set(layout.names))[:5]
            raise FedscoreError(
                f"optimiser state {head!r} and the model disagree on parameters {odd}: "
                "a state saved for another model?"
            )
        lead = named[layout.names[0]].ndim - len(layout.shapes[0])
        state[head] = layout.flatten(named, batch_dims=lead)
    return state
