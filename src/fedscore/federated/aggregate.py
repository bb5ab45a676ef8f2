"""Eq. 8, the server's coordinate-wise aggregation, as a mergeable statistic.

    theta_{q+1}^(i) = (1 / |N_q^(i)|) sum_{n in N_q^(i)} theta_{q,n,S}^(i),
    N_q^(i) = {n : m_{q,n}^(i) = 1}                                              (8)

computed in two steps: `masked_sums` turns workers' models into per-coordinate sums and
counts (which add across any split of the workers, so a Flower server merges partial sums
from replies as they arrive), and `finish` divides. A coordinate no worker kept
(|N_q^(i)| = 0) follows `uncovered`: "keep" theta_q^(i) (SPEC §2's default), "zero" it, or
raise ("error"). Published implementations disagree here, so the choice is explicit.

Worker models and masks come either stacked (name -> (N, *shape), what the in-process
engine holds) or as a list of per-worker dicts (what a server collects); both are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown

Params = dict[str, Tensor]
Workers = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]
UNCOVERED = ("keep", "zero", "error")


def _as_list(workers: Workers) -> list[Mapping[str, Tensor]]:
    if isinstance(workers, Mapping):
        return [{k: v[i] for k, v in workers.items()} for i in range(n_workers(workers))]
    return list(workers)


def n_workers(workers: Workers) -> int:
    """N: the leading axis of stacked tensors, or the length of a list of dicts."""
    if isinstance(workers, Mapping):
        sizes = {v.shape[0] for v in workers.values()}
        if len(sizes) != 1:
            raise FedscoreError(f"stacked tensors disagree on the number of workers: {sizes}")
        return sizes.pop()
    return len(workers)


def masked_sums(worker_params: Workers, masks: Workers) -> tuple[Params, Params]:
    """(sums, counts): sum_{n in N^(i)} theta_n^(i) and |N^(i)| per coordinate.

    sums[name] has the parameter's shape and dtype; counts[name] is int64, same shape.
    Values at pruned coordinates are ignored (torch.where, so even a NaN there is harmless).
    """
    n = n_workers(worker_params)
    if n != n_workers(masks):
        raise FedscoreError(f"{n} worker models but {n_workers(masks)} masks")
    if n == 0:
        raise FedscoreError("no worker models to aggregate")
    if isinstance(worker_params, Mapping) and isinstance(masks, Mapping):
        _check_names(worker_params, masks)
        sums = {k: torch.where(masks[k], v, 0).sum(0) for k, v in worker_params.items()}
        counts = {k: masks[k].sum(0, dtype=torch.long) for k in worker_params}
        return sums, counts
    models, ms = _as_list(worker_params), _as_list(masks)
    for model, mask in zip(models, ms):
        _check_names(model, mask)
    sums = {k: torch.zeros_like(v) for k, v in models[0].items()}
    counts = {k: torch.zeros(v.shape, dtype=torch.long, device=v.device)
              for k, v in models[0].items()}
    for model, mask in zip(models, ms):
        for k in sums:
            sums[k] = sums[k] + torch.where(mask[k], model[k], 0)
            counts[k] = counts[k] + mask[k]
    return sums, counts


def merge_sums(*parts: tuple[Params, Params]) -> tuple[Params, Params]:
    """Add (sums, counts) of disjoint groups of workers: the statistic of their union."""
    if not parts:
        raise FedscoreError("merge_sums needs at least one (sums, counts) pair")
    sums = {k: v.clone() for k, v in parts[0][0].items()}
    counts = {k: v.clone() for k, v in parts[0][1].items()}
    for s, c in parts[1:]:
        for k in sums:
            sums[k] += s[k]
            counts[k] += c[k]
    return sums, counts


def finish(
    params: Params, sums: Params, counts: Params, uncovered: str = "keep"
) -> tuple[Params, Params]:
    """(theta_{q+1}, coverage) from eq. 8's sums and counts; coverage = counts (int64)."""
    if uncovered not in UNCOVERED:
        raise unknown("uncovered policy", uncovered, UNCOVERED)
    if uncovered == "error":
        empty = {k: int((c == 0).sum()) for k, c in counts.items() if bool((c == 0).any())}
        if empty:
            raise FedscoreError(
                f"{sum(empty.values())} coordinate(s) were kept by no worker this round "
                f"(per tensor: {empty}); set uncovered to 'keep' or 'zero', or raise the "
                "keep ratios"
            )
    new = {}
    for k, theta in params.items():
        c = counts[k]
        mean = sums[k] / c.clamp(min=1).to(sums[k].dtype)
        fallback = theta if uncovered == "keep" else torch.zeros_like(theta)
        new[k] = torch.where(c > 0, mean, fallback.to(mean.dtype))
    return new, dict(counts)


def aggregate(
    params: Params, worker_params: Workers, masks: Workers, uncovered: str = "keep"
) -> tuple[Params, Params]:
    """Eq. 8: (new_params, coverage) with coverage[name] = |N_q^(i)| per coordinate (int64).

    params: theta_q (name -> shape); worker_params: theta_{q,n,S}, stacked (N, *shape) or a
    list of N dicts; masks: m_{q,n}, bool, in either form.
    """
    sums, counts = masked_sums(worker_params, masks)
    return finish(params, sums, counts, uncovered)


def round_stats(params: Params, masks: Workers, coverage: Params) -> dict:
    """One round's pruning record (JSON-ready python numbers):

    coverage_hist[c]  number of coordinates kept by exactly c workers, c = 0..N;
    min_coverage      min_i |N_q^(i)| (Gamma* is the min of this over rounds);
    uncovered         coordinates kept by nobody (coverage_hist[0]);
    w2                max_n ||theta_q - theta_q ⊙ m_n||^2 / ||theta_q||^2 (Assumption 2's w^2;
                      0 when theta_q = 0);
    keep_fraction     kept coordinates / D per worker;
    bytes_sent        per worker: kept values * itemsize + ceil(numel / 8) bytes of packed mask
                      bits per tensor whose mask is not full (what flower.payload sends);
    bytes_received    per worker: the dense model theta_q.
    """
    if not isinstance(masks, Mapping):
        masks = {k: torch.stack([m[k] for m in masks]) for k in params}
    n = n_workers(masks)
    hist = torch.zeros(n + 1, dtype=torch.long)
    for c in coverage.values():
        hist += torch.bincount(c.reshape(-1).cpu(), minlength=n + 1)[: n + 1]
    # per worker at once, one tensor at a time: (N,) accumulators
    device = next(iter(params.values())).device
    pruned_sq = torch.zeros(n, dtype=torch.float64, device=device)
    kept = torch.zeros(n, dtype=torch.long, device=device)
    sent = torch.zeros(n, dtype=torch.long, device=device)
    total_sq, dense, numel = 0.0, 0, 0
    for k, theta in params.items():
        sq = theta.detach().double().reshape(1, -1).pow(2)
        m = masks[k].reshape(n, -1)
        pruned_sq += torch.where(m, 0, sq).sum(1)
        kept_k = m.sum(1)
        kept += kept_k
        partial = kept_k < theta.numel()  # a full mask costs no bits
        sent += kept_k * theta.element_size() + partial * math.ceil(theta.numel() / 8)
        total_sq += float(sq.sum())
        dense += theta.numel() * theta.element_size()
        numel += theta.numel()
    w2 = (pruned_sq / total_sq).tolist() if total_sq > 0 else [0.0] * n
    return {
        "coverage_hist": hist.tolist(),
        "min_coverage": int(min(int(c.min()) for c in coverage.values())),
        "uncovered": int(hist[0]),
        "w2": max(w2),
        "keep_fraction": (kept.double() / numel).tolist(),
        "bytes_sent": sent.tolist(),
        "bytes_received": dense,
    }


def _check_names(model: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> None:
    if set(model) != set(mask):
        raise FedscoreError(
            f"masks and parameters name different tensors: only in params "
            f"{sorted(set(model) - set(mask))}, only in masks {sorted(set(mask) - set(model))}"
        )
    for k, m in mask.items():
        if m.dtype != torch.bool:
            raise FedscoreError(f"mask of {k!r} has dtype {m.dtype}; masks must be bool")
        if m.shape != model[k].shape:
            raise FedscoreError(
                f"mask of {k!r} has shape {tuple(m.shape)} but the parameter has "
                f"{tuple(model[k].shape)}"
            )
