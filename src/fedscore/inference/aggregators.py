"""Aggregators: K agents' scores -> one score function for the unchanged samplers (SPEC §3).

Every aggregator reads the agents through one callable `scores(x, t) -> (K, B, *x.shape[1:])`
(a stack of K score functions, K networks evaluated in one vectorised call, see agents.py,
or either wrapped, e.g. by diffusion.clip_denoised) and is itself a score function
`(x, t) -> (B, ...)`. K is read from the scores' leading axis, so a wrapper need carry no
attribute.

- `mean`     the FI paper: (1/K) sum_i s_i. This is the score of the normalised geometric
             mean prod_i q_t^i^{1/K} (a soft AND), not of the agents' mixture: where the
             agents disagree it puts mass between their modes.
- `weighted` sum_i pi_i s_i with fixed pi (data sizes, per class for conditional sampling).
- `hybrid`   the FI paper's suggestion: few agents early in the reverse process (large t),
             more later; a schedule maps forward time to the number of agents taking part.
- `mixture`  the score of the mixture q_t = sum_i pi_i q_t^i:
                 grad log q_t = sum_i w_i(x, t) s_i,   w_i = pi_i q_t^i(x) / q_t(x),
             with log q_t^i tracked along the sampler's own trajectory by the Itô density
             estimator (SuperDiff, Skreta et al. 2024), derived in `MixtureAggregator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown

ScoreFn = Callable[[Tensor, Tensor], Tensor]
MultiScore = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> (K, B, ...)


def stack_scores(score_fns: Sequence[ScoreFn]) -> MultiScore:
    """K separate score functions as one (x, t) -> (K, B, ...) callable (a Python loop; the
    vectorised version for K networks of one architecture is agents.StackedAgents)."""
    fns = list(score_fns)
    if not fns:
        raise FedscoreError("federated inference needs at least one agent")

    def scores(x: Tensor, t: Tensor) -> Tensor:
        return torch.stack([f(x, t) for f in fns])

    return scores


class _Agents:
    """The agents an aggregator combines: a list of K score functions, or one callable
    (x, t) -> (K, B, ...). `n_agents` is K: known from the list (or the callable's own
    `n_agents`, as StackedAgents has), else from the first scores evaluated."""

    def __init__(self, agents):
        if callable(agents):
            self.scores: MultiScore = agents
            n = getattr(agents, "n_agents", None)
            self.n_agents: int | None = None if n is None else int(n)
        else:
            fns = list(agents)
            self.scores, self.n_agents = stack_scores(fns), len(fns)

    def agent_scores(self, x: Tensor, t: Tensor) -> Tensor:
        """(K, B, ...) scores of the agents at x (B, ...)."""
        s = self.scores(x, t)
        if s.ndim != x.ndim + 1 or s.shape[1:] != x.shape:
            raise FedscoreError(
                f"the agents' scores have shape {tuple(s.shape)} for x of shape "
                f"{tuple(x.shape)}; a callable of agents must return (K, *x.shape) — pass "
                "separate score functions as a list"
            )
        if self.n_agents is None:
            self.n_agents = s.shape[0]
        elif s.shape[0] != self.n_agents:
            raise FedscoreError(f"expected {self.n_agents} agents' scores, got {s.shape[0]}")
        return s


def _weights(weights, k: int, batch: int, device) -> Tensor:
    """Normalised agent weights as (B, K) float64; `weights` is (K,) or (B, K) or None."""
    if weights is None:
        w = torch.ones(k, dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape[-1] != k or w.ndim not in (1, 2) or (w.ndim == 2 and w.shape[0] != batch):
        raise FedscoreError(
            f"agent weights must have shape ({k},) or (batch, {k}); got {tuple(w.shape)}"
        )
    if (w < 0).any() or (w.sum(-1) <= 0).any():
        raise FedscoreError("agent weights must be non-negative with a positive sum")
    w = w / w.sum(-1, keepdim=True)
    return w.expand(batch, k).to(device)


def _combine(scores: Tensor, w: Tensor) -> Tensor:
    """sum_i w[b, i] scores[i, b, ...]."""
    shape = w.T.shape + (1,) * (scores.ndim - 2)
    return (w.T.reshape(shape).to(scores.dtype) * scores).sum(0)


class MeanAggregator(_Agents):
    """The FI paper's aggregator: the uniform average of the agents' scores."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.agent_scores(x, t).mean(0)


class WeightedAggregator(_Agents):
    """sum_i pi_i s_i with fixed weights pi ((K,), or (B, K) e.g. per-class counts of each
    sample's label)."""

    def __init__(self, agents, weights=None):
        super().__init__(agents)
        self.weights = weights

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.agent_scores(x, t)
        return _combine(s, _weights(self.weights, self.n_agents, x.shape[0], x.device))


def step_schedule(switch_time: float = 1.0, early: int = 1) -> Callable[[float, int], int]:
    """`early` agents while the forward time is above `switch_time`, then all K."""

    def schedule(t: float, k: int) -> int:
        return min(early, k) if t > switch_time else k

    return schedule


class HybridAggregator(_Agents):
    """The FI paper's hybrid (its §5): at forward time t only the first m(t) agents, in
    decreasing order of weight, take part (weighted among themselves); m(t) grows as the
    reverse process approaches the data. Default: one agent above t = 1, all below."""

    def __init__(self, agents, weights=None, schedule=None):
        super().__init__(agents)
        self.weights = weights
        self.schedule = schedule or step_schedule()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.agent_scores(x, t)
        k = self.n_agents
        m = self.schedule(float(t.reshape(-1)[0]), k)
        if not 1 <= m <= k:
            raise FedscoreError(f"the hybrid schedule asked for {m} agents; it must be 1..{k}")
        w = _weights(self.weights, k, x.shape[0], x.device)
        order = torch.argsort(w, dim=1, descending=True, stable=True)
        active = torch.zeros_like(w, dtype=torch.bool).scatter(1, order[:, :m], True)
        w = torch.where(active, w, torch.zeros_like(w))
        return _combine(s, w / w.sum(1, keepdim=True))


class MixtureAggregator(_Agents):
    """The exact score of the mixture sum_i pi_i q_t^i, with the weights tracked along the
    trajectory (no extra network calls, no data shared, no retraining).

    Derivation. The forward OU density obeys d_t q = div(x q) + Lap q, so
        d_t log q = d + x . grad log q + Lap log q + ||grad log q||^2.
    Let the sampler move x by any Itô process in reverse time tau (t = T - tau) whose noise
    is sqrt(2) dW: dx = b dtau + sqrt(2) dW. Itô's formula for l_i = log q^i_{T - tau}(x):
        dl_i = (-d_t log q^i + s_i . b + Lap log q^i) dtau + sqrt(2) s_i . dW
             = (-d - x . s_i - ||s_i||^2 + s_i . b) dtau + sqrt(2) s_i . dW,
    and since sqrt(2) dW = dx - b dtau the drift b cancels:
        dl_i = <dx - x dtau, s_i> - ||s_i||^2 dtau - d dtau.
    Discretised at the left point of each step of length h, dropping the -d h common to
    all agents (it cancels in the softmax):
        l_i += <x_next - x - h x, s_i(x, t)> - h ||s_i(x, t)||^2,   l_i(T) = log pi_i,
    w = softmax(l), in float64 with the max subtracted. The derivation needs the sampler's
    noise to have quadratic variation 2h per step: exact for Euler–Maruyama, to O(h^2) for
    the exponential integrator (variance e^{2h} - 1); the deterministic probability-flow ODE
    does not qualify (its dx has no noise, and the Laplacian term would be needed).

    One instance serves one sampling run (its state is the batch's l); `reset()` reuses it.
    """

    def __init__(self, agents, weights=None):
        super().__init__(agents)
        self.weights = weights
        self.reset()

    def reset(self) -> None:
        self.log_w: Tensor | None = None  # (B, K) float64: log pi_i + tracked log q_t^i
        self._cache: tuple[Tensor, Tensor] | None = None  # (x, scores at x)

    def weights_now(self) -> Tensor:
        """The current mixture weights w_i(x_t, t), (B, K)."""
        if self.log_w is None:
            raise FedscoreError("no sampling step has been taken yet")
        return torch.softmax(self.log_w, dim=1)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.agent_scores(x, t)
        if self.log_w is None or self.log_w.shape[0] != x.shape[0]:
            self.log_w = torch.log(_weights(self.weights, self.n_agents, x.shape[0], x.device))
        self._cache = (x, s)
        return _combine(s, self.weights_now())

    def observe(self, x_prev: Tensor, x_next: Tensor, t_prev: Tensor, t_next: Tensor) -> None:
        if self._cache is not None and self._cache[0] is x_prev:
            s = self._cache[1]
        else:  # the sampler evaluated elsewhere last (e.g. a Heun corrector): recompute
            s = self.agent_scores(x_prev, t_prev)
        h = (t_prev - t_next).to(torch.float64).reshape(-1, 1)  # (B, 1)
        s64 = s.flatten(2).to(torch.float64)  # (K, B, D)
        dx = (x_next - x_prev - h.reshape(-1, *[1] * (x_prev.ndim - 1)) * x_prev)
        dx64 = dx.flatten(1).to(torch.float64)  # (B, D)
        gain = (s64 * dx64).sum(-1).T - h * s64.pow(2).sum(-1).T  # (B, K)
        self.log_w = self.log_w + gain
        self.log_w = self.log_w - self.log_w.max(dim=1, keepdim=True).values
        self._cache = None


AGGREGATORS: dict[str, Callable[..., ScoreFn]] = {
    "mean": lambda agents, weights=None, **kw: MeanAggregator(agents),
    "weighted": lambda agents, weights=None, **kw: WeightedAggregator(agents, weights),
    "hybrid": lambda agents, weights=None, **kw: HybridAggregator(agents, weights, **kw),
    "mixture": lambda agents, weights=None, **kw: MixtureAggregator(agents, weights),
}


def combine(score_fns, aggregator: str = "mean", weights=None, **options) -> ScoreFn:
    """One score function from K agents (SPEC §6).

    score_fns: a list of score functions, or one callable (x, t) -> (K, B, ...).
    weights:   pi, (K,) or (B, K); used by weighted, hybrid and mixture (uniform if None).
    options:   `schedule=` for hybrid.
    """
    if aggregator not in AGGREGATORS:
        raise unknown("aggregator", aggregator, AGGREGATORS)
    return AGGREGATORS[aggregator](score_fns, weights=weights, **options)
