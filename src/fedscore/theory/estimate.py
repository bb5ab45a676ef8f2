"""Estimators of Theorem 1's constants on a federated run (SPEC §4; the pruning paper's
Assumptions 1-3 and the left-hand side of Theorem 1).

Pure functions of a loss `loss_fn(params, batch) -> scalar` (the engine's signature: batch
holds the data and the pre-drawn noise), a params dict and batches stacked per worker:

  Gamma*    min_{q,i} |N_q^(i)| from the masks                          exact (eq. 8)
  w^2       max_n ||theta_q - theta_q ⊙ m_n||^2 / ||theta_q||^2            Assumption 2
  sigma_1^2 E||grad f_n(theta, xi) - grad F_n(theta)||^2 per worker       Assumption 3
  sigma_2^2 ||grad F_n(theta) - grad F(theta)||^2 per worker              Assumption 3
  L         ||grad F_n(a) - grad F_n(b)|| / ||a - b|| along the run       Assumption 1
  F(theta_q) = (1/N) sum_n F_n(theta_q), ||theta_q||^2, ||grad F(theta_q)||^2     eq. 6

F_n and grad F_n are the mean loss and gradient over a worker's "full" batches (its whole
partition, or a large sample, with fresh DSM noise), so every "full" quantity is itself an
estimate: the spreads sigma_1^2, sigma_2^2 and ||grad F||^2 come out slightly too LARGE (by
the variance of the large-batch mean, about sigma_1^2 B / B_full), the safe direction for a
bound. Assumptions 1 and 3 bound all theta; a run sees only its own trajectory, so L,
sigma_1, sigma_2 and w measured on it are LOWER estimates of the uniform constants.

`estimate_round` measures one round (a JSON-ready dict the run loop logs under "theory");
`Estimator` remembers the previous observation for L and observes every k rounds;
`constants_from_metrics` turns the logged records into the keyword arguments of
`theory.theorem1` (sigma1, sigma2, w as standard deviations / ratios, not squares).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from fedscore.errors import FedscoreError
from fedscore.federated.aggregate import n_workers, round_stats
from fedscore.federated.local import FlatLayout, index_batch, leading_size

Params = dict[str, Tensor]
Batch = Any  # a tensor or a (nested) tuple / list / dict of tensors, as in the engine
LossFn = Callable[[Params, Batch], Tensor]
Masks = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]


def _stacked(masks: Masks) -> Mapping[str, Tensor]:
    if isinstance(masks, Mapping):
        return masks
    return {k: torch.stack([m[k] for m in masks]) for k in masks[0]}


def coverage_min(masks: Masks) -> int:
    """min_i |N_q^(i)| of one round: masks name -> bool (N, *shape), or a list of N dicts."""
    stacked = _stacked(masks)
    return int(min(int(m.sum(0, dtype=torch.long).min()) for m in stacked.values()))


def gamma_star(masks_by_round: Iterable[Masks]) -> int:
    """Gamma* = min over rounds q and coordinates i of |N_q^(i)| (eq. 8), exactly."""
    values = [coverage_min(m) for m in masks_by_round]
    if not values:
        raise FedscoreError("gamma_star needs the masks of at least one round")
    return min(values)


def pruning_w2(params: Params, masks: Masks) -> float:
    """Assumption 2's w^2 at theta_q: max_n ||theta_q - theta_q ⊙ m_n||^2 / ||theta_q||^2
    (0 when theta_q = 0), as `federated.round_stats` reports it."""
    stacked = _stacked(masks)
    coverage = {k: m.sum(0, dtype=torch.long) for k, m in stacked.items()}
    return float(round_stats(params, stacked, coverage)["w2"])


def gradients(loss_fn: LossFn, params: Params, batches: Batch) -> tuple[Tensor, Tensor]:
    """Per-batch flat gradients and losses: batches stacked (N, M, ...) -> ((N, M, D), (N, M)).

    D runs over the params in sorted name order (`federated.local.FlatLayout`)."""
    layout = FlatLayout(params)
    theta = layout.flatten(params).detach()
    grad_fn = grad_and_value(layout.loss(loss_fn))
    n, m = leading_size(batches), leading_size(batches, axis=1)
    grads = torch.empty(n, m, theta.numel(), dtype=theta.dtype, device=theta.device)
    losses = torch.empty(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            g, value = grad_fn(theta, index_batch(batches, (i, j)))
            grads[i, j], losses[i, j] = g.detach(), float(value)
    return grads, losses


def batch_variance(batch_grads: Tensor, center: Tensor) -> Tensor:
    """Assumption 3's first spread per worker: mean_m ||g_{n,m} - center_n||^2.

    batch_grads (N, M, D): mini-batch gradients grad f_n(theta, xi_m); center (N, D): the
    worker's full gradient grad F_n(theta). Returns (N,) float64."""
    return (batch_grads.double() - center.double()[:, None]).pow(2).sum(-1).mean(-1)


def worker_spread(full_grads: Tensor) -> Tensor:
    """Assumption 3's second spread: ||grad F_n - grad F||^2 per worker, (N, D) -> (N,),
    with grad F = (1/N) sum_n grad F_n (eq. 6 weighs workers equally)."""
    g = full_grads.double()
    return (g - g.mean(0)).pow(2).sum(-1)


def lipschitz_ratio(
    grads_a: Tensor, grads_b: Tensor, theta_a: Tensor, theta_b: Tensor
) -> tuple[float, float]:
    """(max_n ||G_n(a) - G_n(b)|| / ||a - b||, ||G(a) - G(b)|| / ||a - b||), G = mean_n G_n.

    grads_* (N, D) at the flat points theta_* (D,). Each ratio is <= Assumption 1's L, so
    this is a LOWER estimate of L: the true constant is a sup over all pairs, the run sees
    a few. NaN when a = b."""
    step = float((theta_a.double() - theta_b.double()).norm())
    if step == 0.0:
        return math.nan, math.nan
    diff = grads_a.double() - grads_b.double()
    return float(diff.norm(dim=-1).max()) / step, float(diff.mean(0).norm()) / step


def estimate_round(
    loss_fn: LossFn,
    params: Params,
    worker_batches: Batch | None,
    full_batches: Batch,
    *,
    q: int,
    previous_params: Params | None = None,
    masks: Masks | None = None,
    S: int | None = None,
    eta: float | None = None,
) -> dict:
    """The constants of Theorem 1 measured at theta_q, as JSON-ready numbers.

    loss_fn(params, batch) -> scalar; params: theta_q (name -> shape); worker_batches: the
    round's mini-batches stacked (N, M, ...) (e.g. the S batches of eq. 7), or None to skip
    sigma_1; full_batches: stacked (N, C, ...), C chunks whose mean loss and gradient stand
    for F_n and grad F_n; previous_params: an earlier theta on the trajectory: L's ratio is
    taken between it and theta_q with both gradients on these same full batches (common
    noise, so the ratio measures the loss and not the noise); masks: round q's masks for
    Gamma_q and w^2; S, eta: recorded for `constants_from_metrics`.

    Keys: q, N, F (= (1/N) sum_n F_n), F_workers, grad_sq (||grad F||^2), theta_sq
    (||theta_q||^2), sigma2_sq_{max,mean}; with worker_batches sigma1_sq_{max,mean,workers};
    with previous_params L_est (max over workers), L_global, step_norm; with masks
    min_coverage, w2; S and eta when given.
    """
    layout = FlatLayout(params)
    full, losses = _mean_gradients(loss_fn, params, full_batches)
    theta = layout.flatten(params).detach()
    spread = worker_spread(full)
    record: dict[str, Any] = {
        "q": int(q),
        "N": int(full.shape[0]),
        "F": float(losses.mean()),
        "F_workers": losses.tolist(),
        "grad_sq": float(full.double().mean(0).pow(2).sum()),
        "theta_sq": float(theta.double().pow(2).sum()),
        "sigma2_sq_max": float(spread.max()),
        "sigma2_sq_mean": float(spread.mean()),
    }
    if worker_batches is not None:
        if leading_size(worker_batches) != full.shape[0]:
            raise FedscoreError(
                f"worker_batches has {leading_size(worker_batches)} workers but full_batches "
                f"has {full.shape[0]}"
            )
        batch_grads, _ = gradients(loss_fn, params, worker_batches)
        var = batch_variance(batch_grads, full)
        record |= {"sigma1_sq_max": float(var.max()), "sigma1_sq_mean": float(var.mean()),
                   "sigma1_sq_workers": var.tolist()}  # fmt: skip
    if previous_params is not None:
        before, _ = _mean_gradients(loss_fn, previous_params, full_batches)
        prev = FlatLayout(previous_params).flatten(previous_params).detach()
        l_workers, l_global = lipschitz_ratio(full, before, theta, prev)
        record |= {"L_est": l_workers, "L_global": l_global,
                   "step_norm": float((theta.double() - prev.double()).norm())}  # fmt: skip
    if masks is not None:
        if n_workers(masks) != full.shape[0]:
            raise FedscoreError(f"{n_workers(masks)} masks for {full.shape[0]} workers")
        record |= {"min_coverage": coverage_min(masks), "w2": pruning_w2(params, masks)}
    if S is not None:
        record["S"] = int(S)
    if eta is not None:
        record["eta"] = float(eta)
    return record


def _mean_gradients(loss_fn: LossFn, params: Params, batches: Batch) -> tuple[Tensor, Tensor]:
    """(grad F_n (N, D), F_n (N,)) as means over each worker's C chunks, streamed."""
    layout = FlatLayout(params)
    theta = layout.flatten(params).detach()
    grad_fn = grad_and_value(layout.loss(loss_fn))
    n, c = leading_size(batches), leading_size(batches, axis=1)
    grads = torch.zeros(n, theta.numel(), dtype=torch.float64, device=theta.device)
    losses = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for j in range(c):
            g, value = grad_fn(theta, index_batch(batches, (i, j)))
            grads[i] += g.detach().double()
            losses[i] += float(value)
    return grads / c, losses / c


class Estimator:
    """Observes a run every `every` rounds (`theory: {estimate: true, every: k}`).

    `observe(q, params, full_batches, ...)` returns `estimate_round`'s dict at theta_q, or
    None when round q is not due; L's ratio is taken against the previous observation
    (re-evaluated on the current full batches). Call it with theta_q BEFORE round q's
    update, and once more with q = Q and `force=True` after the last round, so that F(theta_0),
    E||theta_0||^2 (q = 0) and F(theta_Q) are measured. After a resume the first
    observation has no L ratio (the previous theta is not kept).
    """

    def __init__(self, loss_fn: LossFn, *, every: int = 1, S: int | None = None,
                 eta: float | None = None) -> None:  # fmt: skip
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FedscoreError(f"theory.every must be a whole number >= 1 (got {every!r})")
        self.loss_fn, self.every, self.S, self.eta = loss_fn, every, S, eta
        self.previous: Params | None = None

    def due(self, q: int) -> bool:
        return q % self.every == 0

    def observe(
        self,
        q: int,
        params: Params,
        full_batches: Batch,
        worker_batches: Batch | None = None,
        masks: Masks | None = None,
        *,
        force: bool = False,
    ) -> dict | None:
        if not (force or self.due(q)):
            return None
        record = estimate_round(
            self.loss_fn, params, worker_batches, full_batches, q=q,
            previous_params=self.previous, masks=masks, S=self.S, eta=self.eta,
        )  # fmt: skip
        self.previous = {k: v.detach().clone() for k, v in params.items()}
        return record


def theory_records(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The observations in metrics.jsonl records ("theory": a dict or a list of dicts),
    sorted by q; a later record for the same q (a redone round) replaces an earlier one."""
    by_q: dict[int, dict] = {}
    for record in records:
        obs = record.get("theory")
        for o in [obs] if isinstance(obs, Mapping) else (obs or []):
            if not isinstance(o, Mapping) or "q" not in o:
                raise FedscoreError(f"a 'theory' entry in metrics.jsonl has no 'q': {o!r}")
            by_q[int(o["q"])] = dict(o)
    return [by_q[q] for q in sorted(by_q)]


def constants_from_metrics(records: Iterable[Mapping[str, Any]], **given: float) -> dict:
    """Theorem 1's constants from a run's metrics.jsonl records (`RunFolder.metrics()`).

    Q is the number of rounds logged; Gamma* = min of every round's `min_coverage` and
    w = sqrt(max of every round's `w2`) (the engine's `round_stats`, exact for the run's
    masks); from the "theory" observations: sigma1 = sqrt(max sigma1_sq_max), sigma2 =
    sqrt(max sigma2_sq_max) (Assumption 3 is a uniform bound, so the max; the means are
    in sigma1_mean, sigma2_mean), L = max L_est (a lower estimate), F0 and theta0_sq at
    q = 0, FQ at the last observation (q = Q ideally), eta and S as recorded, and
    observed_lhs = mean of ||grad F(theta_q)||^2 over the observed q < Q, an estimate of
    (1/Q) sum_{q<Q} ||grad F(theta_q)||^2. `given` overrides or supplies any constant.

    Returns theorem1's keyword arguments plus observed_lhs, sigma1_mean, sigma2_mean,
    lhs_curve ([[Q', running estimate of (1/Q') sum_{q<Q'} ...], ...]), sources (how each
    constant was obtained) and notes.
    """
    records = list(records)
    obs = theory_records(records)
    if not obs:
        raise FedscoreError(
            "no 'theory' observations in metrics.jsonl: train with `theory: {estimate: true, "
            "every: k}` in the config, or give the constants with `fedscore bound --params`"
        )
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    rounds = [int(r["round"]) for r in records if "round" in r]
    Q = max(rounds) if rounds else max(o["q"] for o in obs)
    out["Q"], sources["Q"] = Q, "rounds logged in metrics.jsonl"
    out["N"], sources["N"] = obs[0]["N"], "workers"
    coverage = [r["min_coverage"] for r in records if "min_coverage" in r]
    coverage = coverage or [o["min_coverage"] for o in obs if "min_coverage" in o]
    if coverage:
        out["gamma_star"] = min(coverage)
        sources["gamma_star"] = f"exact: min coverage over {len(coverage)} rounds' masks"
    w2 = [r["w2"] for r in records if "w2" in r] or [o["w2"] for o in obs if "w2" in o]
    if w2:
        out["w"] = math.sqrt(max(w2))
        sources["w"] = f"sqrt(max w^2 over {len(w2)} rounds), at the rounds' theta_q"
    for k in ("sigma1", "sigma2"):
        seen = [o for o in obs if f"{k}_sq_max" in o]
        if seen:
            out[k] = math.sqrt(max(o[f"{k}_sq_max"] for o in seen))
            out[f"{k}_mean"] = math.sqrt(sum(o[f"{k}_sq_mean"] for o in seen) / len(seen))
            sources[k] = f"sqrt(max over workers and {len(seen)} observations) (mean in {k}_mean)"
    ratios = [o["L_est"] for o in obs if math.isfinite(o.get("L_est", math.nan))]
    if ratios:
        out["L"] = max(ratios)
        sources["L"] = f"LOWER estimate: max gradient-difference ratio over {len(ratios)} pairs"
    for k in ("S", "eta"):
        values = {o[k] for o in obs if k in o}
        if values:
            out[k], sources[k] = values.pop(), "recorded by the estimator"
    first, last = obs[0], obs[-1]
    out["F0"], out["theta0_sq"] = first["F"], first["theta_sq"]
    sources["F0"] = sources["theta0_sq"] = f"observed at q={first['q']}"
    if first["q"] != 0:
        notes.append(f"no observation at q=0: F(theta_0), E||theta_0||^2 taken at q={first['q']}")
    out["FQ"], sources["FQ"] = last["F"], f"observed at q={last['q']}"
    if last["q"] != Q:
        notes.append(f"no observation at q=Q={Q}: F(theta_Q) taken at q={last['q']}")
    inside = [o for o in obs if o["q"] < Q]
    if inside:
        out["observed_lhs"] = sum(o["grad_sq"] for o in inside) / len(inside)
        sources["observed_lhs"] = (
            f"mean ||grad F(theta_q)||^2 over {len(inside)} observed q < Q (full-batch gradients)"
        )
        out["lhs_curve"] = [
            [o["q"] + 1, sum(p["grad_sq"] for p in inside[: i + 1]) / (i + 1)]
            for i, o in enumerate(inside)
        ]
    for k, v in given.items():
        out[k], sources[k] = v, "given"
    out["sources"], out["notes"] = sources, notes
    return out
