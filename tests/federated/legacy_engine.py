"""A FROZEN copy of the federated engine before the optimiser spec (commit d958f77:
src/fedscore/federated/local.py and engine.py, imports merged, nothing else changed).

The reference for test_optim_equivalence.py: the refactored engine must give bit-identical
results for the same inputs. Delete this file (and that test's legacy half) once the
refactor is merged and no one needs the proof re-run."""

# ruff: noqa

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedscore.errors import FedscoreError, unknown
from fedscore.federated.aggregate import finish, masked_sums, n_workers, round_stats

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

STRATEGIES = ("auto", "vmap", "chunked", "sequential")
AUTO_VMAP_MAX_PARAMS = 200_000
DEFAULT_CHUNK = 4


def choose_strategy(params: Params) -> str:
    """The "auto" rule: "vmap" on an accelerator or for a small conv-free model on CPU,
    "sequential" otherwise (see the module docstring for the measurements behind it)."""
    first = next(iter(params.values()))
    if first.device.type != "cpu":
        return "vmap"
    numel = sum(p.numel() for p in params.values())
    has_conv = any(p.ndim > 2 for p in params.values())
    return "vmap" if numel <= AUTO_VMAP_MAX_PARAMS and not has_conv else "sequential"


def train_workers(
    global_params: Params,
    masks: dict[str, Tensor],
    worker_batches: Batch,
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int | None = None,
    optimizer: str = "sgd",
    opt_state: dict | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Params, dict | None, Tensor]:
    """Eq. 7 for all N workers: (theta_{q,n,S} name -> (N, *shape), stacked opt state or
    None, losses (N, S)). Arguments as in `run_round`."""
    layout, worker_flat, state, losses = _train_flat(
        global_params, masks, worker_batches, loss_fn, lr=lr, steps=steps, optimizer=optimizer,
        opt_state=opt_state, betas=betas, eps=eps, strategy=strategy, chunk_size=chunk_size,
    )
    return layout.unflatten(worker_flat, copy=True), layout.state_from_flat(state), losses


def run_round(
    global_params: Params,
    masks: dict[str, Tensor],
    worker_batches: Batch,
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int | None = None,
    optimizer: str = "sgd",
    opt_state: dict | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    strategy: str = "auto",
    chunk_size: int | None = None,
    uncovered: str = "keep",
) -> tuple[Params, Params, dict, dict | None, Tensor]:
    """Round q: every worker's eq. 7 from theta_q ⊙ m_n, then eq. 8.

    global_params: theta_q, name -> shape; masks: name -> bool (N, *shape) (`build_masks`);
    worker_batches: pytree of tensors (N, S', ...) with S' >= S pre-drawn batches per worker
    (data and noise); opt_state: stacked Adam state {"m", "v": name -> (N, *shape),
    "step": (N,)} to continue, or None for fresh moments (the caller resets it per round or
    keeps it); sgd ignores it. chunk_size: workers per vectorised call for "chunked"
    (default 4).

    Returns (theta_{q+1}, coverage name -> int64 shape, `round_stats` dict, stacked opt state
    or None for sgd, worker losses (N, S)).
    """
    layout, worker_flat, state, losses = _train_flat(
        global_params, masks, worker_batches, loss_fn, lr=lr, steps=steps, optimizer=optimizer,
        opt_state=opt_state, betas=betas, eps=eps, strategy=strategy, chunk_size=chunk_size,
    )
    with torch.no_grad():
        # eq. 8 on the flat (N, D) matrix: two reductions instead of two per tensor
        sums, counts = masked_sums({"flat": worker_flat}, {"flat": layout.flatten(masks, 1)})
        del worker_flat
        flat_new, _ = finish({"flat": layout.flatten(global_params)}, sums, counts, uncovered)
        new_params = layout.unflatten(flat_new["flat"], copy=True)
        coverage = layout.unflatten(counts["flat"], copy=True)
    stats = round_stats(global_params, masks, coverage)
    return new_params, coverage, stats, layout.state_from_flat(state), losses


def _train_flat(
    global_params: Params, masks: dict[str, Tensor], batches: Batch, loss_fn: LossFn, *,
    lr: float, steps: int | None, optimizer: str, opt_state: dict | None,
    betas: tuple[float, float], eps: float, strategy: str, chunk_size: int | None,
) -> tuple[FlatLayout, Tensor, dict, Tensor]:
    """(layout, worker models (N, D), flat stacked state, losses (N, S))."""
    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    if strategy not in STRATEGIES:
        raise unknown("engine strategy", strategy, STRATEGIES)
    n = n_workers(masks)
    if leading_size(batches) != n:
        raise FedscoreError(
            f"worker_batches has {leading_size(batches)} workers on its leading axis "
            f"but masks have {n}"
        )
    steps = check_steps(steps, leading_size(batches, axis=1))
    if strategy == "auto":
        strategy = choose_strategy(global_params)
    hyper = dict(lr=lr, optimizer=optimizer, betas=betas, eps=eps)
    layout = FlatLayout(global_params)
    with torch.no_grad():
        if strategy == "sequential":
            return (layout, *_sequential(layout, global_params, masks, batches, loss_fn,
                                         opt_state, steps, hyper))
        size = n if strategy == "vmap" else (chunk_size or DEFAULT_CHUNK)
        if size < 1:
            raise FedscoreError(f"chunk_size must be at least 1, got {chunk_size}")
        return (layout, *_vectorised(layout, global_params, masks, batches, loss_fn,
                                     opt_state, steps, hyper, size))


def _fresh_state(theta: Tensor, optimizer: str) -> dict:
    """Zero Adam moments and step counts for stacked workers theta (N, D); {} for sgd."""
    if optimizer == "sgd":
        return {}
    return {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta),
            "step": torch.zeros(theta.shape[0], dtype=torch.long, device=theta.device)}


def _slice(state: dict, index) -> dict:
    return {k: v[index] for k, v in state.items()}


def _vectorised(
    layout: FlatLayout, global_params: Params, masks: dict[str, Tensor], batches: Batch,
    loss_fn: LossFn, opt_state: dict | None, steps: int, hyper: dict, size: int,
) -> tuple[Tensor, dict, Tensor]:
    """vmap of the gradient over groups of `size` workers (size = N: one call per step)."""
    n = n_workers(masks)
    flat_masks = layout.flatten(masks, 1)  # (N, D)
    # eq. 7's start theta_q ⊙ m_n for all workers at once
    theta = torch.where(flat_masks, layout.flatten(global_params).detach()[None], 0)
    state = (layout.state_to_flat(opt_state, 1) if opt_state and hyper["optimizer"] == "adam"
             else _fresh_state(theta, hyper["optimizer"]))
    grad_all = vmap(grad_and_value(layout.loss(loss_fn)))
    outs, states, losses = [], [], []
    for lo in range(0, n, size):
        part = slice(lo, min(lo + size, n))
        th, m, st = theta[part], flat_masks[part], _slice(state, part)
        chunk_losses = []
        for s in range(steps):
            grad, loss = grad_all(th, index_batch(batches, (part, s)))
            th, st = apply_update(th, grad, m, st, **hyper)
            chunk_losses.append(loss)
        outs.append(th)
        states.append(st)
        losses.append(torch.stack(chunk_losses, dim=1))
    if len(outs) == 1:
        return outs[0], states[0], losses[0]
    merged = {k: torch.cat([st[k] for st in states]) for k in states[0]}
    return torch.cat(outs), merged, torch.cat(losses)


def _sequential(
    layout: FlatLayout, global_params: Params, masks: dict[str, Tensor], batches: Batch,
    loss_fn: LossFn, opt_state: dict | None, steps: int, hyper: dict,
) -> tuple[Tensor, dict, Tensor]:
    """local_update per worker on views of the stacked masks, batches and state."""
    n = n_workers(masks)
    adam = hyper["optimizer"] == "adam"
    outs, states, losses = [], [], []
    for w in range(n):
        state = None
        if adam and opt_state:
            state = {"m": {k: v[w] for k, v in opt_state["m"].items()},
                     "v": {k: v[w] for k, v in opt_state["v"].items()},
                     "step": opt_state["step"][w]}
        theta, state, loss = local_update(
            global_params, {k: v[w] for k, v in masks.items()}, index_batch(batches, w),
            loss_fn, steps=steps, opt_state=state, **hyper,
        )
        outs.append(layout.flatten(theta))
        states.append(layout.state_to_flat(state))
        losses.append(loss)
    stacked = {k: torch.stack([st[k] for st in states]) for k in states[0]} if adam else {}
    return torch.stack(outs), stacked, torch.stack(losses)
