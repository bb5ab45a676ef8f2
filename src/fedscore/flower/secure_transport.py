"""The secure Flower transport of the round loop: one round of eq. 8 through Flower's
SecAgg+ (`federation.secure_aggregation: true`; see flower/secure.py for the maths).

Per round it runs Flower's `SecAggPlusWorkflow` once, the route Flower's own SecAgg+
example takes: the workflow runs inside a `LegacyContext` holding a small Strategy
(`EqEightStrategy`). Its `configure_fit` sends theta_q, the resolved config and the round
to the round's SuperNodes; each worker runs eq. 7 and answers [s·θ⊙m, m, s·loss] in the
legacy fit-result layout, which Flower's `secaggplus_mod` masks on the node; the workflow
sums the masked vectors, unmasks the sum (recovering dropped workers' masks from their
shares) and hands `aggregate_fit` the mean, which becomes eq. 8's (sums, counts).

What the server learns: per coordinate the sum of theta_n ⊙ m_n and the count of workers
that kept it, the mean loss, and in the clear each worker's partition id, round, timings
and device (Flower's fit-result metrics). Not known, recorded as None: each worker's
mask, keep fraction, w^2 and loss; the coverage statistics and Gamma* come from counts.
Replies cannot be checked one by one (`flower.validate`), so partition ids are not bound
to nodes either: keeping unknown nodes out is SuperNode authentication's job (`--auth`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.federated.loop import RoundOutcome
from fedscore.flower import secure
from fedscore.flower.transport import FlowerRounds, exchange

Params = dict[str, Tensor]
Observer = Callable[[str, Message], None]


def content_bytes(content: RecordDict) -> int:
    """The payload bytes of a message's records: arrays by Flower's own `count_bytes`,
    config and metric values by their size (bytes and text by length, numbers 8 bytes,
    lists element by element) plus their keys; protobuf framing not counted."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(str(k)) + _value_bytes(v) for k, v in record.items())
    return total


def _value_bytes(v) -> int:
    if isinstance(v, list | tuple):
        return sum(_value_bytes(x) for x in v)
    if isinstance(v, bytes | str):
        return len(v)
    return 8


def stage_of(message: Message) -> str:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs[Key.STAGE]) if configs is not None and Key.STAGE in configs else "?"


class EarlyDropout(Exception):
    """Nodes lost in SecAgg+'s setup or share-keys stage, before their key shares reached
    anyone. Flower 1.42's workflow still counts them as sampled and, when unmasking, asks
    the survivors for shares of their keys, which nobody holds (each survivor's ClientApp
    fails with a KeyError and the round is lost; measured on loopback with a SuperNode
    killed between rounds). So the transport stops there and restarts the setup without
    them: new keys, nothing of any value sent yet, and a node that never shared a key is
    simply not part of the round."""

    def __init__(self, nodes: set[int]):
        super().__init__(f"nodes {sorted(nodes)} dropped before SecAgg+'s keys were shared")
        self.nodes = nodes


class SecAggGrid:
    """The Grid the workflow talks to: the run's grid, but `send_and_receive` is the plain
    transport's bounded exchange (replies mapped back to nodes, polled every `poll` s, at
    most `timeout` s per stage) and every stage's bytes and failures are recorded. An
    error reply is not handed on: the workflow sees that node as dropped. `observe(stage,
    reply)`, if given, sees every reply the server receives (tests use it)."""

    def __init__(self, grid: Grid, timeout: float, poll: float, observe: Observer | None):
        self.grid, self.timeout, self.poll, self.observe = grid, timeout, poll, observe
        self.bytes: dict[str, dict[str, int]] = {}
        self.up_by_node: dict[str, dict[int, int]] = {}
        self.failures: dict[int, str] = {}

    def __getattr__(self, name):  # everything else is the run's grid
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = stage_of(messages[0]) if messages else "?"
        down = sum(content_bytes(m.content) for m in messages)
        replies, failures = exchange(self.grid, messages, self.timeout, self.poll)
        for node, why in failures.items():
            self.failures.setdefault(node, f"SecAgg+ stage {stage}: {why}")
        up = {node: content_bytes(r.content) for node, r in replies.items()}
        self.up_by_node[stage] = up
        done = self.bytes.setdefault(stage, {"down": 0, "up": 0})  # a restarted setup adds
        done["down"] += down
        done["up"] += sum(up.values())
        if self.observe is not None:
            for reply in replies.values():
                self.observe(stage, reply)
        if stage in (Stage.SETUP, Stage.SHARE_KEYS) and failures:
            raise EarlyDropout(set(failures))
        return [replies[n] for n in sorted(replies)]


class EqEightStrategy(Strategy):
    """The Strategy SecAggPlusWorkflow drives for one round: `configure_fit` sends every
    node of the round theta_q with the config text and the round number; `aggregate_fit`
    keeps the unmasked mean (and each result's clear-text metrics). Evaluation is not
    federated here (held-out eq. 9 runs where the data are)."""

    def __init__(self, nodes: list[int], config_text: str, q: int, grid: Grid):
        self.nodes, self.config_text, self.q, self.grid = nodes, config_text, q, grid
        self.mean: list[np.ndarray] | None = None
        self.metrics: dict[int, dict] = {}
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        fitins = FitIns(parameters, {"config": self.config_text, "round": self.q})
        run_id = getattr(getattr(self.grid, "run", None), "run_id", 0)
        return [(GridClientProxy(node, self.grid, run_id), fitins) for node in self.nodes]

    def aggregate_fit(self, server_round, results: list[tuple[GridClientProxy, FitRes]],
                      failures):
        self.failures = list(failures)
        if results:  # the workflow gives every result the same aggregated parameters
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class SecureFlowerTransport(FlowerRounds):
    """Rounds over the SuperNodes of `grid` through SecAgg+ (the settings of
    `setup.fed.secagg`); the same waits and failure handling as `FlowerTransport`."""

    observe: Observer | None = None

    def run_round(self, q: int, params: Params) -> RoundOutcome:
        fed = self.setup.fed
        sa = fed.secagg
        t0 = time.perf_counter()
        nodes, wait = self.connected()
        need = max(self.min_replies, secure.flower_shares(sa, fed.workers).threshold)
        if len(nodes) < need:
            raise FedscoreError(
                f"round {q + 1}: only {len(nodes)} SuperNode(s) connected after {wait:g} s; "
                f"secure aggregation needs {need} (SecAgg+'s reconstruction threshold); "
                f"{self.folder_hint}start the SuperNodes and resume")
        secure.check_fits(params, sa, q)
        grid = SecAggGrid(self.grid, self.round_timeout, self.poll, self.observe)
        alive = list(nodes)
        while True:
            strategy = EqEightStrategy(alive, self.config_text, q, self.grid)
            try:
                SecAggPlusWorkflow(**secure.workflow_kwargs(sa), timeout=self.round_timeout)(
                    grid, self.context(strategy, params, q))
                break
            except EarlyDropout as lost:  # restart the setup without them (see EarlyDropout)
                alive = [n for n in alive if n not in lost.nodes]
                if len(alive) < need:
                    strategy = EqEightStrategy(alive, self.config_text, q, self.grid)
                    break
        return self.outcome(q, params, nodes, strategy, grid, time.perf_counter() - t0)

    @staticmethod
    def context(strategy: EqEightStrategy, params: Params, q: int) -> LegacyContext:
        """What SecAggPlusWorkflow reads: theta_q and the round in the state's records, and
        the strategy (Flower's `LegacyContext`); a fresh one per workflow run."""
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}), strategy=strategy)
        theta = [params[k].detach().to("cpu").numpy() for k in params]
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: q + 1})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(theta), True)
        return context

    def outcome(self, q: int, params: Params, nodes: list[int], strategy: EqEightStrategy,
                grid: SecAggGrid, t_replies: float) -> RoundOutcome:
        """Round q's outcome from what the workflow handed the strategy: eq. 8's sums and
        counts when SecAgg+ unmasked a sum of at least `min_replies` workers, else None
        (the model stays; the round is logged as degraded with the reason)."""
        fed = self.setup.fed
        sa = fed.secagg
        failures = {str(k): v for k, v in grid.failures.items()}
        metrics = strategy.metrics
        n = len(metrics)
        pids = [int(m.get("partition-id", -1)) for _, m in sorted(metrics.items())]
        dense = sum(v.numel() * v.element_size() for v in params.values())
        collect = grid.up_by_node.get("collect_masked_vectors", {})
        train_s = [float(m.get("train-seconds", 0.0)) for _, m in sorted(metrics.items())]
        record = {
            "replies": n, "workers": sorted(pids),
            "missing_workers": sorted(set(range(fed.workers)) - set(pids)),
            "failed": failures,
            "degraded": n < len(nodes) or len(nodes) < fed.workers,
            "seconds_replies": t_replies, "worker_train_seconds": train_s,
            "worker_startup_seconds": [float(m.get("process-age-seconds", float("nan")))
                                       for _, m in sorted(metrics.items())],
            "worker_devices": [str(m.get("device", "?")) for _, m in sorted(metrics.items())],
            "overhead_seconds": t_replies - max(train_s, default=0.0),
            # dense vectors: every worker sends 2D + 1 masked integers (int64 on the wire)
            # plus SecAgg+'s keys and shares, whatever its keep ratio
            "bytes_up": [collect.get(node, 0) for node in sorted(metrics)],
            "bytes_up_total": sum(b["up"] for b in grid.bytes.values()),
            "bytes_down_total": sum(b["down"] for b in grid.bytes.values()),
            "bytes_dense_fedavg_up_total": dense * n,
            "secagg_bytes": grid.bytes,
        }
        eps = {str(int(m.get("partition-id", -1))): float(m["epsilon"])
               for _, m in sorted(metrics.items())
               if isinstance(m.get("epsilon"), (int, float)) and float(m["epsilon"]) >= 0}
        if eps:  # privacy mode sample: each worker's own accounting, reported in the clear
            record |= {"epsilon": max(eps.values()), "worker_epsilon_reported": eps}
        p = secure.flower_shares(sa, len(nodes))
        info = {"shares": p.shares, "threshold": p.threshold, "neighbours": p.neighbours}
        if strategy.mean is None or n < max(self.min_replies, 1):
            why = ("SecAgg+ could not unmask this round (fewer surviving workers than its "
                   "reconstruction threshold)" if strategy.mean is None else
                   f"{n} replies < min_replies {self.min_replies}")
            record |= {"degraded": True, "secure_aggregation": info | {"halted": why}}
            return RoundOutcome(sums=None, counts=None, masks=None, workers=sorted(pids),
                                worker_loss=[], record=record)
        got = secure.outcome_sums(strategy.mean, n, params, sa)
        kept = sum(int(c.sum()) for c in got.counts.values())
        numel = sum(c.numel() for c in got.counts.values())
        record |= secure.unavailable() | {
            "keep_fraction_mean": kept / (numel * n),
            "secure_aggregation": info | {
                "count_residual_max": got.count_residual,
                "sum_error_bound": secure.quantization_bound(sa, n)},
        }
        return RoundOutcome(sums=got.sums, counts=got.counts,
                            masks=secure.staircase_masks(got.counts, n), workers=sorted(pids),
                            worker_loss=[got.loss], record=record)
