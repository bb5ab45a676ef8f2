"""K agents as one score callable: their forward passes in one vectorised call (SPEC §3).

Federated inference evaluates K networks of one architecture at every reverse step. They
are held as ONE set of stacked parameters (name -> (K, ...) tensor, as
torch.func.stack_module_state makes) and evaluated by one of two strategies, named as the
federated engine names them (one vocabulary for "K stacked copies of one model"):

  "vmap"        torch.func.vmap of the score over the agent axis, in_dims
                (0, None, None, None): one batched call for all K agents, the batch x shared;
  "sequential"  one call per agent on views of the same stacked tensors;
  "threads"     those calls spread over a pool of threads, one intra-op thread each
                (`engine.in_threads`; each thread runs its own copy of the module).

"auto" is the federated engine's rule (`fedscore.federated.engine.choose_strategy`, one rule
for training and inference): "vmap" when the parameters are on an accelerator or the model
is small and conv-free (<= AUTO_VMAP_MAX_PARAMS parameters, no parameter of ndim > 2), else
"threads" (or "sequential" with one torch thread). Why: on this project's 2-core CPU a
prototype measured vmap ~3x faster than a loop for a small MLP (per-call overhead
dominates), but SLOWER for a 0.7 M-parameter conv U-Net: under vmap a conv with per-agent
weights becomes a grouped conv, which is slow on CPU, and the work is compute-bound anyway
(benchmarks/inference_overhead.py measures it).
Name a strategy to override the rule.

Agents trained by `fedscore.experiments.agents.train_agents` keep their run folder;
`load_agents` there stacks them and reads each folder's `class_counts.json`
(`read_class_counts`), the only thing the server may learn of an agent's data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import vmap

from fedscore.diffusion import PARAMETERISATIONS, ScoreModel
from fedscore.errors import FedscoreError, unknown
from fedscore.federated.engine import choose_strategy, in_threads
from fedscore.federated.local import thread_replicas

Params = dict[str, Tensor]
STRATEGIES = ("auto", "vmap", "sequential", "threads")
COUNTS_FILE = "class_counts.json"


def _stack(params) -> Params:
    """name -> (K, ...) from a list of modules or of dicts, or an already stacked dict."""
    if isinstance(params, Mapping):
        stacked = {k: torch.as_tensor(v) for k, v in params.items()}
        sizes = {v.shape[0] if v.ndim else None for v in stacked.values()}
        if not stacked or len(sizes) != 1 or None in sizes:
            raise FedscoreError(
                "stacked agent parameters must be a non-empty dict of tensors that all share "
                f"the leading agent axis; got leading sizes {sorted(map(str, sizes))}"
            )
        return stacked
    items = list(params)
    if not items:
        raise FedscoreError("federated inference needs at least one agent")
    dicts = [
        {**dict(p.named_parameters()), **dict(p.named_buffers())} if isinstance(p, nn.Module)
        else dict(p)
        for p in items
    ]
    names = set(dicts[0])
    for i, d in enumerate(dicts[1:], start=1):
        if set(d) != names:
            raise FedscoreError(
                f"agent {i} has parameters {sorted(set(d) ^ names)[:5]} that agent 0 does not "
                "share (or lacks some of agent 0's): all agents must have one architecture"
            )
    with torch.no_grad():
        return {k: torch.stack([d[k].detach() for d in dicts]) for k in dicts[0]}


class StackedAgents:
    """K score networks of one architecture as one callable `(x, t[, y]) -> (K, B, ...)`.

    model:            the architecture (its own weights are only a fallback for names the
                      stacked dict lacks); called as model(x, t, y).
    params:           a list of K modules or K dicts (name -> tensor), or one stacked dict
                      (name -> (K, ...)).
    parameterisation: how a raw output reads as a score ("eps": s = -out / sigma_t; "score").
    labels:           (B,) class labels bound for class-conditional agents (None: none).
    strategy:         "auto", "vmap" or "sequential" (module docstring).
    counts:           optional (K, C) per-class sample counts of the agents.

    Shapes: x (B, ...), t (B,) forward times -> (K, B, ...) scores. Has `n_agents`, so every
    aggregator of fedscore.inference reads it directly.
    """

    def __init__(
        self,
        model: nn.Module,
        params,
        parameterisation: str = "eps",
        labels: Tensor | None = None,
        strategy: str = "auto",
        counts: Tensor | None = None,
    ):
        if strategy not in STRATEGIES:
            raise unknown("agent strategy", strategy, STRATEGIES)
        self.model = model
        self.params = _stack(params)
        self.n_agents = next(iter(self.params.values())).shape[0]
        # per-agent views of the stacked tensors (no copies), for the "sequential" strategy
        self._views = [{k: v[i] for k, v in self.params.items()} for i in range(self.n_agents)]
        if parameterisation not in PARAMETERISATIONS:
            raise unknown("parameterisation", parameterisation, PARAMETERISATIONS)
        self.parameterisation = parameterisation
        self.labels = labels
        first = {k: v[0] for k, v in self.params.items()}
        self.strategy = (choose_strategy(first, self.n_agents) if strategy == "auto"
                         else strategy)
        self._module = thread_replicas(model)
        if counts is not None:
            counts = torch.as_tensor(counts)
            if counts.ndim != 2 or counts.shape[0] != self.n_agents:
                raise FedscoreError(
                    f"counts must be ({self.n_agents}, classes); got {tuple(counts.shape)}"
                )
        self.counts = counts
        self.config = None  # the agents' RunConfig when loaded from run folders

    def with_labels(self, labels: Tensor | None) -> StackedAgents:
        """The same agents (parameters shared, not copied) with labels (B,) bound."""
        other = object.__new__(StackedAgents)
        other.__dict__.update(self.__dict__)
        other.labels = labels
        return other

    def _one(self, p: Params, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return ScoreModel(self._module(), self.parameterisation, y, params=p)(x, t)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """(K, B, ...) scores of the K agents at x (B, ...), forward times t (B,); labels y
        (B,) override the bound ones (the diagnostics' `agent_scores(x, t, y)`)."""
        y = self.labels if y is None else y
        if y is not None and y.shape[0] != x.shape[0]:
            raise FedscoreError(
                f"{y.shape[0]} labels are bound to the agents but the batch has {x.shape[0]} "
                "samples; bind one label per sample with .with_labels(y)"
            )
        with torch.no_grad():
            if self.strategy == "vmap":
                return vmap(self._one, in_dims=(0, None, None, None))(self.params, x, t, y)
            if self.strategy == "threads":
                return torch.stack(in_threads(
                    lambda i: self._one(self._views[i], x, t, y), self.n_agents))
            return torch.stack([self._one(p, x, t, y) for p in self._views])

    def weights_for(self, labels: Tensor) -> Tensor:
        """(B, K) per-sample agent weights: each agent's count of the sample's label
        (normalised by the aggregators). A label no agent holds falls back to the agents'
        total sizes."""
        if self.counts is None:
            raise FedscoreError("these agents carry no class counts (load them with "
                                "fedscore.experiments.agents.load_agents)")
        return label_weights(self.counts, labels)

    def __repr__(self) -> str:
        return (f"StackedAgents(K={self.n_agents}, model={type(self.model).__name__}, "
                f"strategy={self.strategy!r}, parameterisation={self.parameterisation!r})")


def label_weights(counts: Tensor, labels: Tensor) -> Tensor:
    """(B, K) float64: counts[k, labels[b]], or the agents' total sizes where that column is
    all zero (nobody holds the label, so its count says nothing)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= counts.shape[1]:
        raise FedscoreError(f"labels must lie in [0, {counts.shape[1]}) for these counts")
    w = counts[:, labels].T  # (B, K)
    empty = w.sum(1) <= 0
    if empty.any():
        w[empty] = counts.sum(1)
    return w


def read_class_counts(run_dir: str | Path) -> list[int]:
    """An agent's per-class sample counts from its run folder's class_counts.json."""
    path = Path(run_dir) / COUNTS_FILE
    if not path.is_file():
        raise FedscoreError(
            f"{str(path)!r} does not exist: agent folders are written by `fedscore agents "
            "train` (fedscore.experiments.agents.train_agents), which records each agent's "
            "class counts"
        )
    return [int(c) for c in json.loads(path.read_text())["class_counts"]]


REGIMES: dict[str, str] = {
    "control": "all",  # FI §4.1 CONTROL: one agent holds all the data
    "homogeneous": "homogeneous",  # 10% of every digit each
    "heterogeneous": "dominant",  # agent j: 50% digit j, 50% evenly the others
}
"""Regime -> partition scheme of fedscore.data.partition."""
