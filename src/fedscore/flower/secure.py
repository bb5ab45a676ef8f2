"""Eq. 8 under Flower's SecAgg+ (issue 19): what a worker contributes, what the server gets
back, and the settings that make the two agree.

SecAgg+ (Bell et al., CCS 2020; Flower's `SecAggPlusWorkflow` + `secaggplus_mod`) sums
integer vectors without revealing any single one. Flower's workflow hands the strategy the
example-weighted MEAN of the workers' float vectors, each clipped to [-c, c] (c =
`clipping_range`) and stochastically rounded to one of T = `quantization_range` levels.
Every worker reports num_examples = 1, so over the N_q workers that answered

    mean_n [s·(theta_n ⊙ m_n), m_n, s·loss_n] = [s·S / N_q, C / N_q, s·L / N_q]

where S and C are eq. 8's per-coordinate sum and count (`aggregate.masked_sums`) and s =
`secagg.scale`. `outcome_sums` turns it back: sums = mean·N_q / s, counts = round(mean·N_q).

Quantisation (Flower's `quantize`): each value carries an unbiased error of at most one
step 2c/T, so one coordinate of S carries at most N_q·2c/T (typically sqrt(N_q)·c/T) and of
theta_{q+1} = S / C at most N_q·2c/(T·s·C) <= N_q·2c/(T·s). C is exact after rounding
whenever N_q·2c/T < 1/2 (checked: `plan`). With Flower's defaults (c = 8, T = 2^22) and
s = 1 that is 3.8e-6·N_q per round.

Values beyond [-c, c] would be clipped by Flower without a word, biasing eq. 8: a worker
whose scaled values or loss do not fit fails its reply instead, with the reason
(`secure_vectors`), and the server refuses a theta_q that does not fit before the round
(`check_fits`). Masks are sent unscaled (0 or 1), so c >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedscore.config import RunConfig, SecAggConfig
from fedscore.errors import FedscoreError

Params = dict[str, Tensor]
MODULUS = 2**32
"""Flower's default `modulus_range`: the ring the masked sums live in."""


@dataclass(frozen=True)
class SecAggPlan:
    """SecAgg+'s numbers for a round with `nodes` sampled workers, as Flower computes them
    (`SecAggPlusWorkflow.setup_stage`): each worker's secrets are split into `shares`
    shares held by its neighbours (itself included), `threshold` of which unmask it."""

    nodes: int
    shares: int
    threshold: int
    neighbours: int  # workers holding one worker's shares (itself included)

    @property
    def tolerated_dropouts(self) -> int:
        """Workers that may drop out of a neighbourhood with the round still unmasked."""
        return self.neighbours - self.threshold


def flower_shares(sa: SecAggConfig, nodes: int) -> SecAggPlan:
    """(shares, threshold) for `nodes` sampled workers, following Flower 1.42's
    `SecAggPlusWorkflow` (its __init__ normalisation, then setup_stage's arithmetic)."""
    shares, threshold = sa.num_shares, sa.reconstruction_threshold
    if isinstance(shares, int) and shares == 1:
        shares = 1.0
    if isinstance(threshold, int) and threshold == 1:
        threshold = 1.0
    if isinstance(shares, float):
        s = round(shares * nodes)
        if s < nodes and s % 2 == 0:
            s += 1
        if s <= 2:
            s = nodes
    else:
        s = shares
    t = max(round(threshold * s), 2) if isinstance(threshold, float) else threshold
    if nodes != s and s % 2 == 0:  # Flower makes the share count odd after the threshold
        s += 1
    neighbours = min(2 * (s >> 1) + 1, nodes)
    return SecAggPlan(nodes=nodes, shares=s, threshold=t, neighbours=neighbours)


def workflow_kwargs(sa: SecAggConfig) -> dict:
    """SecAggPlusWorkflow's arguments. max_weight = 1: every worker's weight is 1, so
    Flower's weight factor round(1 / max_weight · T) is T exactly and the values are
    quantised unscaled (Flower's default max_weight 1000 would shrink them 1000-fold
    before quantisation and cost three decimal digits)."""
    return {"num_shares": sa.num_shares, "reconstruction_threshold": sa.reconstruction_threshold,
            "max_weight": 1.0, "clipping_range": float(sa.clipping_range),
            "quantization_range": int(sa.quantization_range), "modulus_range": MODULUS}


def plan(cfg: RunConfig) -> SecAggPlan:
    """Refuse secure-aggregation settings that cannot work, one FedscoreError each (before
    any process starts); returns SecAgg+'s numbers for all `federation.workers`."""
    from flwr.server.workflow import SecAggPlusWorkflow

    fed = cfg.federation
    sa = fed.secagg
    n = fed.workers
    where = "federation.secagg"
    if n < 2:
        raise FedscoreError(f"secure aggregation needs at least 2 workers (SecAgg+ hides one "
                            f"worker among the others); federation.workers is {n}")
    if fed.max_update_norm is not None:
        raise FedscoreError(
            "federation.max_update_norm bounds each reply's update, but under secure "
            "aggregation the server never sees one reply's values to check it; remove it "
            "(or turn federation.secure_aggregation off)")
    try:  # Flower's own checks of the settings (shares vs threshold, ranges)
        SecAggPlusWorkflow(**workflow_kwargs(sa))
    except (ValueError, TypeError) as err:
        raise FedscoreError(f"{where}: Flower's SecAgg+ refuses these settings: {err}") from None
    p = flower_shares(sa, n)
    if p.shares > n:
        raise FedscoreError(f"{where}.num_shares is {p.shares} but there are only {n} workers "
                            "to hold the shares; give at most the number of workers, or a "
                            "fraction (1.0: every worker)")
    if p.threshold > p.neighbours:
        raise FedscoreError(
            f"{n} workers are fewer than the SecAgg+ reconstruction threshold: each worker's "
            f"secrets go to {p.neighbours} workers and {p.threshold} of them are needed to "
            f"unmask it ({where}.num_shares {sa.num_shares} -> {p.shares} shares, "
            f"reconstruction_threshold {sa.reconstruction_threshold} -> {p.threshold}); lower "
            f"{where}.reconstruction_threshold or add workers")
    c, t = float(sa.clipping_range), int(sa.quantization_range)
    if c < 1:
        raise FedscoreError(f"{where}.clipping_range is {c:g}, but each worker's mask entries "
                            "(0 or 1) travel unscaled and must fit in [-c, c]: use c >= 1 "
                            "and fit the values with secagg.scale")
    if n * t >= MODULUS:
        raise FedscoreError(
            f"{where}: {n} workers x quantization_range {t} = {n * t} would overflow SecAgg+'s "
            f"2^32 ring; use quantization_range below {MODULUS // n}")
    if n * 2 * c / t >= 0.5:
        raise FedscoreError(
            f"{where}: with {n} workers the quantisation error of a coordinate's count can "
            f"reach {n} x 2 x {c:g} / {t} = {n * 2 * c / t:.3g} >= 0.5, so eq. 8's counts "
            "could not be recovered exactly; raise quantization_range or lower clipping_range")
    return p


def quantization_bound(sa: SecAggConfig, replies: int) -> float:
    """The most one coordinate of eq. 8's sum S may differ from the plain sum (in the
    parameters' units): N_q quantisation steps of 2c / T each, over the scale."""
    return replies * 2 * float(sa.clipping_range) / (int(sa.quantization_range) * sa.scale)


def _flat(tensors: Params, names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[k].detach().to("cpu", torch.float64).reshape(-1).numpy()
                           for k in names]) if names else np.zeros(0)


def secure_vectors(theta: Params, mask: Params, loss: float, sa: SecAggConfig,
                   noise: Params | None = None) -> list[np.ndarray]:
    """One worker's SecAgg+ contribution: [s·(theta ⊙ m) (D,), m (D,), s·loss (1,)], float64,
    coordinates in the order of `theta`'s names (the order of the model's state dict, which
    server and workers build alike). The place to clip and noise the update for client-level
    DP (issue 19 item 2) before it is masked.

    Raises FedscoreError, naming the largest value, when anything would be clipped by
    SecAgg+'s [-c, c] (the reply fails; the server sees it as a dropout with that reason)."""
    names = list(theta)
    kept = {k: torch.where(mask[k].to(theta[k].device), theta[k].detach(), 0) for k in names}
    if noise is not None:  # DP-FedAvg's distributed share: on EVERY coordinate (the sum of
        # all N shares is N(0, (z C)^2) wherever any worker kept the coordinate)
        kept = {k: v + noise[k].to(v.device, v.dtype) for k, v in kept.items()}
    values = _flat(kept, names) * sa.scale
    m = _flat({k: mask[k].to(torch.float64) for k in names}, names)
    loss_s = np.array([float(loss) * sa.scale])
    c = float(sa.clipping_range)
    if not (np.isfinite(values).all() and np.isfinite(loss_s).all()):
        raise FedscoreError("this worker's model or loss is not finite after eq. 7; it cannot "
                            "be aggregated (lower federation.lr)")
    big = float(np.abs(values).max(initial=0.0))
    if big > c:
        raise FedscoreError(
            f"this worker's kept values reach {big / sa.scale:.4g}; times federation.secagg."
            f"scale {sa.scale:g} that is {big:.4g}, beyond SecAgg+'s clipping range {c:g}, "
            f"which would clip them and bias eq. 8: set secagg.scale <= {c / big * sa.scale:.3g} "
            "or raise secagg.clipping_range")
    if abs(loss_s[0]) > c:
        raise FedscoreError(
            f"this worker's mean local loss {loss:.4g} times federation.secagg.scale "
            f"{sa.scale:g} is beyond SecAgg+'s clipping range {c:g} (the loss is aggregated "
            "securely too); lower secagg.scale or raise secagg.clipping_range")
    return [values, m, loss_s]


def check_fits(params: Params, sa: SecAggConfig, q: int) -> None:
    """The server's check of theta_q before round q: the workers start from it, so if it
    does not fit SecAgg+'s clipping range after scaling, no worker's update will."""
    big = max((float(v.detach().abs().max()) for v in params.values() if v.numel()),
              default=0.0)
    if big * sa.scale > sa.clipping_range:
        raise FedscoreError(
            f"round {q + 1}: theta_q reaches |{big:.4g}|, times federation.secagg.scale "
            f"{sa.scale:g} beyond SecAgg+'s clipping range {sa.clipping_range:g}; set "
            f"secagg.scale <= {sa.clipping_range / big / 2:.3g} (half the range leaves room "
            "for the local updates) or raise secagg.clipping_range")


@dataclass
class SecureSums:
    """Eq. 8's statistic as recovered from SecAgg+'s mean over `replies` workers."""

    sums: Params  # sum_n theta_n ⊙ m_n per coordinate, the parameters' dtype
    counts: Params  # |N_q^(i)|, int64
    loss: float  # mean over the workers of their mean local loss
    count_residual: float  # max |mean(m)·N_q - counts|: the quantisation noise rounded away


def outcome_sums(mean: list[np.ndarray], replies: int, like: Params, sa: SecAggConfig
                 ) -> SecureSums:
    """(sums, counts, loss) from SecAgg+'s aggregated [s·θ⊙m, m, s·loss] (the mean over
    `replies` workers, `secure_vectors`' layout). like: theta_q, for names, shapes, dtypes."""
    names = list(like)
    d = sum(like[k].numel() for k in names)
    if len(mean) != 3 or mean[0].shape != (d,) or mean[1].shape != (d,) or mean[2].shape != (1,):
        raise FedscoreError(
            f"SecAgg+ returned arrays of shapes {[tuple(a.shape) for a in mean]}; expected "
            f"[({d},), ({d},), (1,)] (values, mask, loss) for this model")
    values = np.asarray(mean[0], dtype=np.float64) * replies / sa.scale
    raw = np.asarray(mean[1], dtype=np.float64) * replies
    counts = np.clip(np.rint(raw), 0, replies)
    residual = float(np.abs(raw - counts).max(initial=0.0))
    sums, cnts, at = {}, {}, 0
    for k in names:
        n, shape = like[k].numel(), like[k].shape
        sums[k] = torch.from_numpy(values[at:at + n].copy()).reshape(shape).to(like[k].dtype)
        cnts[k] = torch.from_numpy(counts[at:at + n].astype(np.int64)).reshape(shape)
        at += n
    return SecureSums(sums, cnts, float(mean[2][0]) / sa.scale, residual)


def staircase_masks(counts: Params, replies: int) -> Params:
    """Masks (replies, *shape) that the server can stand behind: any N_q masks whose
    coverage is `counts` — worker j "keeps" coordinate i iff j < counts[i]. The server
    never learns the real ones; they exist only so that `aggregate.round_stats` computes
    the coverage statistics (histogram, min, uncovered), which depend on counts alone. Its
    per-worker fields (w2, keep_fraction, bytes) are overwritten with None by the secure
    transport."""
    j = torch.arange(replies).reshape(replies, 1)
    return {k: (j < c.reshape(1, -1)).reshape(replies, *c.shape) for k, c in counts.items()}


def unavailable() -> dict:
    """The round record's per-worker fields the server cannot know under SecAgg+."""
    return {"w2": None, "keep_fraction": None, "bytes_sent": None, "bytes_received": None,
            "worker_loss": None}


def check_privacy(cfg) -> None:
    """Differential privacy on Flower, one FedscoreError per combination that would not
    protect what it claims: distributed noise without secure aggregation (the server would
    see every worker's update with only its 1/sqrt(N) share of the noise), and
    federation.max_update_norm with privacy mode client (the clip bounds the update; a
    second, dropping bound would change the mechanism the accountant counts)."""
    p = getattr(cfg, "privacy", None)
    if p is None:
        return
    fed = cfg.federation
    if p.mode == "client" and p.noise == "distributed" and not fed.secure_aggregation:
        raise FedscoreError(
            "privacy.noise: distributed gives each worker 1/sqrt(N) of the noise, which "
            "protects the sum only if nobody sees one worker's update: turn on "
            "federation.secure_aggregation, or use privacy.noise: central (the server clips "
            "and noises)")
    if p.mode == "client" and fed.max_update_norm is not None:
        raise FedscoreError(
            "privacy.mode client clips every update to privacy.clip; drop "
            "federation.max_update_norm (a reply beyond it would be dropped, a mechanism "
            "the accountant does not count)")
