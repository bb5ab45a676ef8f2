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
             Stochastic samplers only; first order in the step.
- `route`    the same mixture by routing: each sample follows one agent drawn with
             probability pi_i (exact with exact agents, one agent evaluation per sample
             per step, any sampler).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedscore import diffusion
from fedscore.diffusion.samplers import KERNELS
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


def _clip(x: Tensor, t: Tensor, score: Tensor, clip: bool) -> Tensor:
    """score, or the score whose denoised estimate is clipped to [-1, 1] (clip_denoised)."""
    return diffusion.clip_denoised(lambda _x, _t: score)(x, t) if clip else score


class MixtureAggregator(_Agents):
    """The exact score of the mixture sum_i pi_i q_t^i, with the weights tracked along the
    trajectory (no extra network calls, no data shared, no retraining).

    Continuous time. The forward OU density obeys d_t q = div(x q) + Lap q, so
        d_t log q = d + x . grad log q + Lap log q + ||grad log q||^2.
    Let the sampler move x by any Itô process in reverse time tau (t = T - tau) whose noise
    is sqrt(2) dW: dx = b dtau + sqrt(2) dW. Itô's formula for l_i = log q^i_{T - tau}(x):
        dl_i = (-d_t log q^i + s_i . b + Lap log q^i) dtau + sqrt(2) s_i . dW
             = (-d - x . s_i - ||s_i||^2 + s_i . b) dtau + sqrt(2) s_i . dW,
    and since sqrt(2) dW = dx - b dtau the drift b cancels (SuperDiff's Itô estimator,
    Skreta et al. 2024): dl_i = <dx - x dtau, s_i> - ||s_i||^2 dtau - d dtau. The noise's
    quadratic variation 2 dtau is what supplies the Laplacian: a sampler without noise (the
    probability-flow ODE) would need Lap log q^i, which no agent gives.

    Discrete time (step-consistent increments). Because the forward process is Markov and the
    same for every agent, log q^i_{t'}(x') - log q^i_t(x) = log r_i(x' | x) - log f(x | x'),
    with r_i agent i's reverse transition and f the (agent-independent) forward kernel. Each
    stochastic sampler step is a Gaussian transition x' = a x + c s(x) + sqrt(v) eps
    (diffusion.samplers.KERNELS); taking r_i as that transition driven by agent i's score
    and dropping all that is common to the agents gives
        l_i += (c / v) <x' - a x, s_i(x, t)> - c^2 / (2 v) ||s_i(x, t)||^2,   l_i(T) = log pi_i,
    w = softmax(l), in float64 with the max subtracted. For Euler–Maruyama (a = 1 + h,
    c = v = 2h) this is the Itô increment above, discretised at the left point; for the
    exponential integrator and the ancestral sampler it uses the noise variance each actually
    injects (the Itô increment assumes 2h). On the issue-17 test (d = 32, 25 steps,
    benchmarks/mixture_weights.py) the worst-time weight error falls 0.290 -> 0.222
    (exponential integrator; its share of samples from the heavier agent 0.81 -> 0.71,
    target 0.70) and 0.068 -> 0.039 (ancestral); Euler–Maruyama is unchanged.

    Order of accuracy: first order in the step. The kernel stands in for r_i with the score
    frozen at the left point and an agent-independent variance, so the error after K steps
    of one grid shape is O(1/K) (measured: 4x the steps, about 1/4 to 1/5 the error). It is
    exact for nothing at finite K; `route` is exact with exact agents at any K.

    Refused: deterministic samplers ("pf-ode", "pf-ode-heun"): `begin_sampling` (called by
    diffusion.sample before the first step) raises FedscoreError. Called without it (a
    hand-written loop calling `observe`), the increment is the Itô one above.

    clip: the combined score is clipped (its denoised estimate to [-1, 1], clip_denoised)
    AFTER mixing, and the weights are tracked with the agents' unclipped scores: a clipped
    agent field is not a gradient, so tracking it would no longer give log q_t^i. The
    tracking holds for any drift, so clipping the sampler's drift costs it nothing.

    One instance serves one sampling run (its state is the batch's l); diffusion.sample
    resets it, and `reset()` does by hand.
    """

    def __init__(self, agents, weights=None, clip: bool = False):
        super().__init__(agents)
        self.weights = weights
        self.clip = clip
        self.kernel: Callable[[float, float], tuple[float, float, float]] | None = None
        self.reset()

    def reset(self) -> None:
        self.log_w: Tensor | None = None  # (B, K) float64: log pi_i + tracked log q_t^i
        self._cache: tuple[Tensor, Tensor] | None = None  # (x, the agents' scores at x)

    def begin_sampling(self, x_T: Tensor, times: Tensor, method: str) -> None:
        """diffusion.sample's hook: refuse a deterministic sampler, start afresh, and track
        with the increments of `method`'s own transition."""
        if method not in KERNELS:
            raise FedscoreError(
                f"the mixture aggregator cannot follow the deterministic sampler {method!r}: "
                "its weights are tracked through the sampler's noise (the probability-flow "
                "ODE has none, and would need each agent's Laplacian). Use a stochastic "
                f"sampler ({', '.join(sorted(KERNELS))}; sample.method in a config), or the "
                "'route' aggregator, which works with any sampler"
            )
        self.kernel = KERNELS[method]
        self.reset()

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
        return _clip(x, t, _combine(s, self.weights_now()), self.clip)

    def observe(self, x_prev: Tensor, x_next: Tensor, t_prev: Tensor, t_next: Tensor) -> None:
        """Add the step's increment to l (class docstring)."""
        if self._cache is not None and self._cache[0] is x_prev:
            s = self._cache[1]
        else:  # the sampler evaluated elsewhere last: recompute
            s = self.agent_scores(x_prev, t_prev)
        s64 = s.flatten(2).to(torch.float64)  # (K, B, D)
        x64, nxt64 = x_prev.flatten(1).to(torch.float64), x_next.flatten(1).to(torch.float64)
        if self.kernel is None:  # no begin_sampling: the Itô increment, per-sample step
            h = (t_prev - t_next).to(torch.float64).reshape(-1, 1)  # (B, 1)
            a, c_over_v, kappa = 1.0 + h, 1.0, 2.0 * h
        else:  # the sampler's own Gaussian step; one time for the batch, as samplers use
            a, c, v = self.kernel(float(t_prev.reshape(-1)[0]), float(t_next.reshape(-1)[0]))
            c_over_v, kappa = c / v, c * c / v
        dot = (s64 * (nxt64 - a * x64)).sum(-1).T  # (B, K)
        gain = c_over_v * dot - 0.5 * kappa * s64.pow(2).sum(-1).T
        self.log_w = self.log_w + gain
        self.log_w = self.log_w - self.log_w.max(dim=1, keepdim=True).values
        self._cache = None


class RouteAggregator(_Agents):
    """The mixture sum_i pi_i q^i sampled by routing: each sample is assigned once to agent i
    with probability pi_i (per sample when weights are (B, K), e.g. the agents' counts of its
    label), then drawn by that agent alone. A draw of the mixture is a draw of a component
    then of that component, so with exact agents this samples the mixture exactly, with any
    sampler, at one agent evaluation per sample per step (SuperDiff, Skreta et al. 2024,
    measured FID 3.99 for it against 4.00 for the Itô mixture on CIFAR-10).

    agents: a list of K score functions, each evaluated on its own rows only; a function
    with per-sample context bound (labels) may define `for_rows(idx)`, the function of those
    batch rows, which is called first. One callable (x, t) -> (K, B, ...) instead is
    evaluated whole and each row's agent kept (K evaluations per sample: give a list to
    save them). `evaluations` counts the agent evaluations (sample-steps) made.

    The assignment is drawn from `generator` when a sampling call begins (diffusion.sample's
    `begin_sampling`) or at the first call, and kept for every call on that batch (a Heun
    corrector's second evaluation too); `reset()` forgets it. A call on a batch of another
    size is refused rather than silently re-routed.
    """

    def __init__(self, agents, weights=None, generator: torch.Generator | None = None,
                 clip: bool = False):
        self.fns = None if callable(agents) else list(agents)
        super().__init__(agents)
        self.weights, self.generator, self.clip = weights, generator, clip
        self.evaluations = 0
        self.reset()

    def reset(self) -> None:
        self.assignment: Tensor | None = None  # (B,) long: each sample's agent

    def begin_sampling(self, x_T: Tensor, times: Tensor, method: str) -> None:
        """diffusion.sample's hook: a fresh assignment for this sampling call's batch."""
        self.assign(x_T.shape[0])

    def assign(self, batch: int) -> Tensor:
        """Draw each of `batch` samples' agent, (B,) long, and keep it."""
        k = self.n_agents
        if k is None and self.weights is not None:  # a callable without n_agents: pi says K
            k = torch.as_tensor(self.weights).shape[-1]
        if k is None:
            raise FedscoreError("route needs the number of agents: pass a list of score "
                                "functions, weights, or a callable with `n_agents`")
        w = _weights(self.weights, k, batch, "cpu")
        self.assignment = torch.multinomial(w, 1, generator=self.generator)[:, 0]
        return self.assignment

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        if self.assignment is None:
            self.assign(batch)
        elif self.assignment.shape[0] != batch:
            raise FedscoreError(
                f"route assigned {self.assignment.shape[0]} samples to agents but was called "
                f"on a batch of {batch}: evaluate the whole batch at once, or reset() it "
                "between sampling calls (diffusion.sample does)"
            )
        agent = self.assignment.to(x.device)
        if self.fns is None:  # one stacked callable: every agent on every row
            s = self.agent_scores(x, t)
            self.evaluations += s.shape[0] * batch
            out = s.gather(0, agent.reshape(1, -1, *[1] * (x.ndim - 1)).expand(1, *x.shape))[0]
        else:
            out = torch.empty_like(x)
            for i, fn in enumerate(self.fns):
                rows = torch.nonzero(agent == i).flatten()
                if len(rows):
                    f = fn.for_rows(rows) if hasattr(fn, "for_rows") else fn
                    out[rows] = f(x[rows], t[rows]).to(x.dtype)
                    self.evaluations += len(rows)
        return _clip(x, t, out, self.clip)


AGGREGATORS: dict[str, Callable[..., ScoreFn]] = {
    "mean": lambda agents, weights=None, **kw: MeanAggregator(agents),
    "weighted": lambda agents, weights=None, **kw: WeightedAggregator(agents, weights),
    "hybrid": lambda agents, weights=None, **kw: HybridAggregator(agents, weights, **kw),
    "mixture": lambda agents, weights=None, **kw: MixtureAggregator(agents, weights, **kw),
    "route": lambda agents, weights=None, **kw: RouteAggregator(agents, weights, **kw),
}


def combine(score_fns, aggregator: str = "mean", weights=None, **options) -> ScoreFn:
    """One score function from K agents (SPEC §6).

    score_fns: a list of score functions, or one callable (x, t) -> (K, B, ...).
    weights:   pi, (K,) or (B, K); used by weighted, hybrid, mixture and route (uniform if
               None).
    options:   `schedule=` for hybrid; `clip=True` for mixture and route (the combined
               score's denoised estimate clipped to [-1, 1]); `generator=` for route.
    """
    if aggregator not in AGGREGATORS:
        raise unknown("aggregator", aggregator, AGGREGATORS)
    return AGGREGATORS[aggregator](score_fns, weights=weights, **options)
