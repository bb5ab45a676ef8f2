"""One federated round for all N workers in one process (SPEC §2: eq. 7 then eq. 8).

Worker models live stacked on a leading axis, as one (N, D) matrix of flat parameter
vectors; no worker ever gets a copy of an nn.Module. Each local step takes its mini-batches
when it runs: from a pre-drawn pytree (N, S, ...), or drawn then from a
`batches.RoundBatches` (one step of a chunk of workers, or of one worker, at a time).
The round splits in three:

  train_workers  eq. 7 for every worker: S steps of the optimiser spec `opt` (`optim.SGD`,
                 `optim.Adam`, whose `update` is the one implementation of the step);
  round_sums     train_workers, then eq. 8's mergeable statistic (sums, counts) per
                 coordinate, what a round loop's "transport" hands back (a Flower server adds
                 the same statistic from its replies);
  run_round      round_sums + `aggregate.finish` + `aggregate.round_stats`: theta_{q+1}.

Strategies: how N stacked copies of one model are run. These names are the project's
vocabulary for that one concept (training here; the same rule and names should serve K
stacked agents at inference):

  "vmap"       torch.func.vmap over the stacked axis: one vectorised gradient call per
               local step for all N workers, then one elementwise update of the (N, D)
               matrix;
  "chunked"    the same over groups of `chunk_size` workers (bounds memory to chunk_size
               workers' activations);
  "sequential" a loop over workers calling `local.local_update` (the Flower client's code
               path) on views of the stacked masks, batches and optimiser state;
  "threads"    the same loop spread over a pool of torch.get_num_threads() Python threads,
               each running its worker with ONE intra-op thread (the loss must be safe to
               call from several threads: `local.make_loss_fn` and `setup.make_loss` give
               each thread its own copy of the module, `local.thread_replicas`);
  "auto"       `choose_strategy`'s pick of one of the above.

The "auto" rule, overridable by naming a strategy:
  - parameters on an accelerator -> "vmap" (batched kernels are what GPUs are for);
  - on CPU, "vmap" only for small models without conv kernels (<= AUTO_VMAP_MAX_PARAMS
    parameters, no parameter of ndim > 2); else "threads" when torch may use more than one
    thread and there is more than one worker, else "sequential".
Why: a prototype on this project's 2-core CPU measured vmap 3.6x faster than a loop for a
19k-parameter MLP, but for a 0.73M-parameter conv U-Net vmap was slower (32 s vs 21 s per
round) and used 4.8x the memory: under vmap a conv with per-worker weights becomes a
grouped conv, slow on CPU, and all N workers' activations are alive at once. And a small
U-Net's convolutions barely use a second intra-op thread: on a 2-core AVX2 CPU (14x14
digits, base 16, batch 32) one worker trained at 306 img/s with 2 threads, 250 with 1, and
two workers side by side, one thread each, at 447 img/s (1.46x; `benchmarks/
throughput.py --strategies`).

Optimiser state is one shape throughout: flat tensors with the worker axis leading,
{"m": (N, D), "v": (N, D), "step": (N,)} for Adam, {} for SGD (`federated.optim`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from fedscore.errors import FedscoreError, unknown
from fedscore.federated.aggregate import finish, masked_sums, n_workers, round_stats
from fedscore.federated.flat import FlatLayout
from fedscore.federated.local import (
    Batch,
    LossFn,
    PrivateGrad,
    check_steps,
    index_batch,
    leading_size,
    local_update,
)
from fedscore.federated.optim import Optimizer, State, check_state

Params = dict[str, Tensor]
STRATEGIES = ("auto", "vmap", "chunked", "sequential", "threads")
AUTO_VMAP_MAX_PARAMS = 200_000
DEFAULT_CHUNK = 4
Contribute = Callable[[Tensor, Tensor, Tensor], Tensor]


def choose_strategy(params: Params, n: int = 2) -> str:
    """The "auto" rule for n stacked copies: "vmap" on an accelerator or for a small conv-free
    model on CPU, else "threads" where torch has more than one thread and n > 1, else
    "sequential" (see the module docstring for the measurements behind it). One rule, in
    these names, for any N stacked copies of one model (workers or agents)."""
    first = next(iter(params.values()))
    if first.device.type != "cpu":
        return "vmap"
    numel = sum(p.numel() for p in params.values())
    has_conv = any(p.ndim > 2 for p in params.values())
    if numel <= AUTO_VMAP_MAX_PARAMS and not has_conv:
        return "vmap"
    return "threads" if torch.get_num_threads() > 1 and n > 1 else "sequential"


def in_threads(fn, n: int, threads: int | None = None) -> list:
    """[fn(0), ..., fn(n - 1)] computed by a pool of `threads` Python threads (default
    torch.get_num_threads()), each op running on ONE intra-op thread (torch releases the GIL
    inside ops; the setting is process-wide and restored after), each thread in the caller's
    grad mode and autocast. threads <= 1: a plain loop.
    fn must be safe to run in several threads at once (`local.thread_replicas`)."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or n <= 1:
        return [fn(i) for i in range(n)]
    # grad mode and autocast are thread-local: the pool's threads run in the caller's
    # (a sampler's no_grad + bf16 autocast must not silently become grad + fp32)
    grad = torch.is_grad_enabled()
    casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
             if torch.is_autocast_enabled(d)]

    def in_caller_modes(i: int):
        with torch.set_grad_enabled(grad), contextlib.ExitStack() as stack:
            for device_type, dtype in casts:
                stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype))
            return fn(i)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, n), thread_name_prefix="fedscore") as pool:
            return list(pool.map(in_caller_modes, range(n)))
    finally:
        torch.set_num_threads(before)


def train_workers(
    global_params: Params,
    masks: dict[str, Tensor],
    worker_batches: Batch,
    loss_fn: LossFn,
    opt: Optimizer,
    *,
    steps: int | None = None,
    state: State | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    dp: PrivateGrad | None = None,
) -> tuple[Params, State, Tensor]:
    """Eq. 7 for all N workers: (theta_{q,n,S} name -> (N, *shape), stacked state, losses
    (N, S)). Arguments as in `run_round`."""
    layout, worker_flat, state, losses = _train_flat(
        global_params, masks, worker_batches, loss_fn, opt, steps=steps, state=state,
        strategy=strategy, chunk_size=chunk_size, dp=dp,
    )
    return layout.unflatten(worker_flat, copy=True), state, losses


def round_sums(
    global_params: Params,
    masks: dict[str, Tensor],
    worker_batches: Batch,
    loss_fn: LossFn,
    opt: Optimizer,
    *,
    steps: int | None = None,
    state: State | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    dp: PrivateGrad | None = None,
    contribute: Contribute | None = None,
) -> tuple[Params, Params, State, Tensor]:
    """Round q up to eq. 8's statistic: every worker's eq. 7, then per coordinate
    sums = sum_{n in N_q^(i)} theta_{q,n,S}^(i) and counts = |N_q^(i)|.

    Returns (sums name -> shape, counts name -> int64 shape, stacked state, losses (N, S)).
    `aggregate.finish(global_params, sums, counts, uncovered)` is theta_{q+1} and
    `aggregate.round_stats(global_params, masks, counts)` the round's record, exactly as
    `run_round` computes them; sums and counts of disjoint groups of workers add
    (`aggregate.merge_sums`). Arguments as in `run_round`, and
    contribute: what each worker contributes to the sums instead of its model (DP-FedAvg's
    clipping and distributed noise, `privacy.RoundPrivacy.contribute`):
    contribute(worker_flat (N, D), theta_q flat (D,), masks flat (N, D)) -> (N, D).
    """
    layout, worker_flat, state, losses = _train_flat(
        global_params, masks, worker_batches, loss_fn, opt, steps=steps, state=state,
        strategy=strategy, chunk_size=chunk_size, dp=dp,
    )
    with torch.no_grad():
        flat_masks = layout.flatten(masks, 1)
        if contribute is not None:
            worker_flat = contribute(worker_flat, layout.flatten(global_params), flat_masks)
        # eq. 8 on the flat (N, D) matrix: two reductions instead of two per tensor
        sums, counts = masked_sums({"flat": worker_flat}, {"flat": flat_masks})
        del worker_flat
        sums = layout.unflatten(sums["flat"], copy=True)
        counts = layout.unflatten(counts["flat"], copy=True)
    return sums, counts, state, losses


def run_round(
    global_params: Params,
    masks: dict[str, Tensor],
    worker_batches: Batch,
    loss_fn: LossFn,
    opt: Optimizer,
    *,
    steps: int | None = None,
    state: State | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    uncovered: str = "keep",
    dp: PrivateGrad | None = None,
) -> tuple[Params, Params, dict, State, Tensor]:
    """Round q: every worker's eq. 7 from theta_q ⊙ m_n, then eq. 8.

    global_params: theta_q, name -> shape; masks: name -> bool (N, *shape) (`build_masks`);
    worker_batches: pytree of tensors (N, S', ...) with S' >= S pre-drawn batches per worker
    (data and noise), or a `batches.RoundBatches` (sizes (N, S')) that draws each step's
    batches when that step runs, so a round never holds more than one step of them;
    opt: the local optimiser (`make_optimizer`); steps: S (default S');
    state: the stacked flat optimiser state to continue ({"m", "v": (N, D), "step": (N,)}
    for Adam), or None for a fresh one (the caller resets it per round or keeps it);
    chunk_size: workers per vectorised call for "chunked" (default 4); uncovered: eq. 8's
    rule for coordinates no worker kept (`aggregate.finish`); dp: DP-SGD's gradient for
    the N workers in this round (`privacy.DPSGD`, mode sample), None: eq. 7's own.

    Returns (theta_{q+1}, coverage name -> int64 shape, `round_stats` dict, stacked state
    ({} for SGD), worker losses (N, S)).
    """
    sums, counts, state, losses = round_sums(
        global_params, masks, worker_batches, loss_fn, opt, steps=steps, state=state,
        strategy=strategy, chunk_size=chunk_size, dp=dp,
    )
    with torch.no_grad():  # elementwise, so the same bits as on the flat vector
        new_params, coverage = finish(global_params, sums, counts, uncovered)
    stats = round_stats(global_params, masks, coverage)
    return new_params, coverage, stats, state, losses


def _train_flat(
    global_params: Params, masks: dict[str, Tensor], batches: Batch, loss_fn: LossFn,
    opt: Optimizer, *, steps: int | None, state: State | None, strategy: str,
    chunk_size: int | None, dp: PrivateGrad | None = None,
) -> tuple[FlatLayout, Tensor, State, Tensor]:
    """(layout, worker models (N, D), stacked flat state, losses (N, S))."""
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
        strategy = choose_strategy(global_params, n)
    layout = FlatLayout(global_params)
    if state:  # shapes only: a meta tensor allocates nothing
        check_state(opt, state, torch.empty(n, sum(layout.sizes), device="meta"))
    with torch.no_grad():
        if strategy in ("sequential", "threads"):
            threads = torch.get_num_threads() if strategy == "threads" else 1
            return (layout, *_sequential(layout, global_params, masks, batches, loss_fn, opt,
                                         state, steps, threads, dp))
        size = n if strategy == "vmap" else (chunk_size or DEFAULT_CHUNK)
        if size < 1:
            raise FedscoreError(f"chunk_size must be at least 1, got {chunk_size}")
        return (layout, *_vectorised(layout, global_params, masks, batches, loss_fn, opt,
                                     state, steps, size, dp))


def _slice(state: State, index) -> State:
    return {k: v[index] for k, v in state.items()}


def _vectorised(
    layout: FlatLayout, global_params: Params, masks: dict[str, Tensor], batches: Batch,
    loss_fn: LossFn, opt: Optimizer, state: State | None, steps: int, size: int,
    dp: PrivateGrad | None = None,
) -> tuple[Tensor, State, Tensor]:
    """vmap of the gradient over groups of `size` workers (size = N: one call per step);
    under DP-SGD, vmap over the workers of its per-sample vmap (`privacy.dpsgd`)."""
    n = n_workers(masks)
    flat_masks = layout.flatten(masks, 1)  # (N, D)
    # eq. 7's start theta_q ⊙ m_n for all workers at once
    theta = torch.where(flat_masks, layout.flatten(global_params).detach()[None], 0)
    state = state or opt.init(theta)
    loss_flat = layout.loss(loss_fn)
    grad_all = vmap(grad_and_value(loss_flat))
    outs, states, losses = [], [], []
    for lo in range(0, n, size):
        part = slice(lo, min(lo + size, n))
        th, m, st = theta[part], flat_masks[part], _slice(state, part)
        chunk_dp = dp.select(part) if dp is not None else None
        chunk_losses = []
        for s in range(steps):
            if chunk_dp is None:
                grad, loss = grad_all(th, index_batch(batches, (part, s)))
            else:
                grad, loss = chunk_dp.grad(loss_flat, th, index_batch(batches, (part, s)), m, s)
            th, st = opt.update(th, grad, m, st)  # elementwise over the (chunk, D) matrix
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
    loss_fn: LossFn, opt: Optimizer, state: State | None, steps: int, threads: int = 1,
    dp: PrivateGrad | None = None,
) -> tuple[Tensor, State, Tensor]:
    """local_update per worker on views of the stacked masks, batches and state; with
    threads > 1, `threads` workers at a time, each with one intra-op thread ("threads")."""

    def worker(w: int):
        theta, st, loss = local_update(
            global_params, {k: v[w] for k, v in masks.items()}, index_batch(batches, w),
            loss_fn, opt, steps=steps, state=_slice(state, w) if state else None,
            dp=dp.select(w) if dp is not None else None,
        )
        return layout.flatten(theta), st, loss

    n = n_workers(masks)
    results = in_threads(worker, n, threads)
    outs, states, losses = (list(r) for r in zip(*results, strict=True))
    stacked = {k: torch.stack([st[k] for st in states]) for k in states[0]}
    return torch.stack(outs), stacked, torch.stack(losses)
