"""Federated inference's ServerApp: the reverse SDE driven on the server, the agents' scores
computed on their silos (SPEC §3 on Flower's Message API).

The server holds no weights and no data. It learns K agents from one `query.describe`
message per SuperNode (`fi_client_app`: each agent's index, resolved config and class
counts), then runs THE sampling code of `fedscore agents sample` in-process
(`experiments.agents.sample_with`: `agents_score_fn` + `draw`, the same labels, grid,
aggregator objects and sampler), with one change: the agents are `RemoteAgents`, a
callable (x, t[, y]) -> (K, B, ...) whose every evaluation is one round of `query.score`
messages — x_t of all samples as one batch, t and the labels to every agent — and the K
replies stacked in agent order. With the same seed the samples equal the in-process ones
(tests/flower/test_fi_flower.py).

Replies are input and are checked against what was sent (`check_score`): the reply's
records and keys, its agent index and call number, a float32 array of exactly x's shape
(sizes read before numpy decodes it), finite values. A bad, failed or missing reply is NOT
dropped, as a training round drops a worker: without agent i the aggregate is another
distribution (the mixture of the others), so sampling stops with one FedscoreError naming
the agent and why. No retry either: a step is idempotent, but an agent that errs or misses
`step_timeout` once (its ClientApp raised, its node died) would do it again; rerunning with
the same seed reproduces the samples.

`route` (each sample drawn by one agent alone) needs no per-step exchange, and has none: the
server draws the sample -> agent assignment as the in-process route does
(`inference.sampling.route_generator(seed)`, the same weights), then sends ONE query.route
message per silo that has rows: the seed, the labels of the whole batch, the sampling grid,
the sampler and that silo's row indices. The silo runs THE sampling code (`draw`, the
unchanged sampler) on the full batch from the prior noise of that seed, with a score
function that evaluates its agent on its rows only (zeros elsewhere), and returns its rows;
every row's trajectory depends only on its own score and noise, so the rows equal the
in-process route's (`RemoteAgents.sample_routed`). Its reply is checked as a score reply
is, and must echo the rows it was sent (`check_samples`); the call's timeout is
`step_timeout` per step.

The result (samples.npz, samples.png, as `sample_agents` writes them) goes to the run
config's `out`, with `flower-fi.json`: this launch's token, state finished/failed (and the
reason), and the per-call timings the benchmark reads.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedscore.config import RunConfig, config_from_text
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import check_agree, check_sampling, sample_with
from fedscore.flower.fi_run import STATUS
from fedscore.flower.transport import exchange, wait_for_nodes
from fedscore.inference.agents import label_weights
from fedscore.io import atomic_write_text

app = ServerApp()
DESCRIBE = f"{MessageType.QUERY}.describe"
SCORE = f"{MessageType.QUERY}.score"
ROUTE = f"{MessageType.QUERY}.route"
NPY_HEADER = 4096  # bytes a .npy header may add to an array's data (numpy writes ~128)


@dataclass
class FISettings:
    """The run config keys of the FI app (`fi_run.FI_PYPROJECT`)."""

    agents: int  # K: one SuperNode per agent
    out: str  # the samples' folder, on the machine that runs the ServerApp
    aggregator: str = "mixture"
    per_label: int = 10
    steps: int = 100
    seed: int = 0
    token: str = ""  # this launch's, written to STATUS
    agent_dirs: str = ""  # JSON list, for the simulation runtime's virtual nodes
    device: str = ""  # where the agents' networks run ("": auto)
    precision: str = ""  # "": each agent's own
    start_wait: float = 120.0  # seconds to wait for the K SuperNodes
    step_timeout: float = 600.0  # seconds to wait for one call's K replies
    poll: float = 0.02  # seconds between pulls of replies

    @classmethod
    def from_run_config(cls, rc: dict) -> FISettings:
        keys = {f: f.replace("_", "-") for f in cls.__dataclass_fields__}
        return cls(**{f: rc[k] for f, k in keys.items() if k in rc})


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_fi_server(grid, FISettings.from_run_config(dict(context.run_config)))


def run_fi_server(grid: Grid, s: FISettings) -> dict[str, Path]:
    """Sample with the K agents of `grid`'s SuperNodes; STATUS records how it ended. A
    failure is also one `[fedscore] failed: ...` line on the server's log."""
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = CallLog()
    try:
        check_sampling(s.aggregator, s.per_label, s.steps)
        agents = RemoteAgents.connect(grid, s.agents, start_wait=s.start_wait,
                                      timeout=s.step_timeout, poll=s.poll, log=calls)
        paths = sample_with(agents, out, aggregator=s.aggregator, per_label=s.per_label,
                            steps=s.steps, seed=s.seed,
                            where=f"{agents.n_agents} agents on Flower")
    except Exception as err:
        _status(out, s.token, "failed", calls, reason=str(err))
        print(f"[fedscore] failed: {err}", flush=True)
        raise
    _status(out, s.token, "finished", calls, agents=agents.names)
    return paths


def _status(out: Path, token: str, state: str, calls: CallLog, **extra) -> None:
    atomic_write_text(out / STATUS, json.dumps(
        {"token": token, "state": state, **extra, "calls": calls.records}, indent=1))


@dataclass
class CallLog:
    """One record per round of score messages: wall seconds from push to the K-th reply,
    and each agent's own time in its forward pass and its ClientApp process age."""

    records: list[dict] = field(default_factory=list)


@dataclass
class Agent:
    """What the server knows of one agent: its node, folder name, config and class counts."""

    index: int
    node: int
    name: str
    config: RunConfig
    counts: list[int]
    signature: dict = field(default_factory=dict)
    diffusers: bool = False  # a diffusers folder: its config is synthesised (signature decides)


class RemoteAgents:
    """K agents on K SuperNodes as one callable `(x, t[, y]) -> (K, B, ...)`, with what
    `agents_score_fn` and the aggregators read of `StackedAgents`: n_agents, counts (K, C),
    config, with_labels, weights_for."""

    def __init__(self, grid: Grid, agents: list[Agent], *, timeout: float, poll: float,
                 log: CallLog, labels: Tensor | None = None):
        self.grid, self.agents, self.timeout, self.poll = grid, agents, timeout, poll
        self.log, self.labels = log, labels
        self.n_agents = len(agents)
        self.names = [a.name for a in agents]
        self.config = agents[0].config
        width = max(len(a.counts) for a in agents)
        self.counts = torch.tensor([a.counts + [0] * (width - len(a.counts)) for a in agents],
                                   dtype=torch.long)  # padded as load_agents pads them

    @classmethod
    def connect(cls, grid: Grid, k: int, *, start_wait: float, timeout: float, poll: float,
                log: CallLog) -> RemoteAgents:
        """Wait for K SuperNodes, describe each, bind node -> agent index."""
        nodes = wait_for_nodes(grid, k, start_wait, max(poll, 0.1))
        if len(nodes) < k:
            raise FedscoreError(f"only {len(nodes)} of {k} agents' SuperNodes connected "
                                f"within {start_wait:g} s")
        messages = [Message(RecordDict({}), dst_node_id=n, message_type=DESCRIBE)
                    for n in nodes]
        replies, failures = exchange(grid, messages, timeout, poll)
        if failures:
            node, why = sorted(failures.items())[0]
            raise FedscoreError(f"SuperNode {node} did not describe its agent: "
                                f"{_failure(why)}")
        agents = bind([describe_reply(replies[n], n, k) for n in nodes], k)
        check_described(agents)
        return cls(grid, agents, timeout=timeout, poll=poll, log=log)

    def with_labels(self, labels: Tensor | None) -> RemoteAgents:
        """The same agents with labels (B,) bound (sent with every call)."""
        return RemoteAgents(self.grid, self.agents, timeout=self.timeout, poll=self.poll,
                            log=self.log, labels=labels)

    def weights_for(self, labels: Tensor) -> Tensor:
        """(B, K): each agent's count of each sample's label (StackedAgents.weights_for)."""
        return label_weights(self.counts, labels)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """(K, B, ...) scores: one query.score message per agent, all K answered and checked
        or one FedscoreError naming the agent."""
        y = self.labels if y is None else y
        call = len(self.log.records)
        inputs = {"x": x, "t": t} | ({"y": y.to(torch.int64)} if y is not None else {})
        content = RecordDict({"inputs": _arrays(inputs),
                              "call": ConfigRecord({"call": call})})
        everyone = dict.fromkeys(range(self.n_agents), content)
        replies, wall = self._round(SCORE, everyone, call, self.timeout)
        checked = [self._checked(i, call, check_score, replies[i], tuple(x.shape))
                   for i in range(self.n_agents)]
        self._log("score", call, wall, list(everyone), [m for _, m in checked])
        return torch.stack([s for s, _ in checked]).to(x.device)

    def sample_routed(self, assignment: Tensor, labels: Tensor, shape: tuple[int, ...],
                      times: Tensor, method: str, seed: int) -> Tensor:
        """`route`'s samples (B, *shape), each row drawn on its agent's silo: one query.route
        message per agent that has rows (seed, labels, grid, sampler, its rows), each reply
        checked (check_samples) and put in its rows. The timeout is `timeout` per step: a
        silo runs the whole reverse process in this one call."""
        call = len(self.log.records)
        rows = {i: torch.nonzero(assignment == i).flatten() for i in range(self.n_agents)}
        rows = {i: r for i, r in rows.items() if len(r)}  # an agent with no rows is not asked
        sent = {"y": labels.to(torch.int64), "times": times.to(torch.float64)}
        meta = ConfigRecord({"call": call, "seed": int(seed), "method": method})
        contents = {i: RecordDict({"inputs": _arrays(sent | {"rows": r}), "call": meta})
                    for i, r in rows.items()}
        replies, wall = self._round(ROUTE, contents, call, self.timeout * (len(times) - 1))
        x = torch.empty((len(labels), *shape), dtype=torch.float32)
        metrics = []
        for i, r in rows.items():
            x[r], m = self._checked(i, call, check_samples, replies[i], r, (len(r), *shape))
            metrics.append(m)
        self._log("route", call, wall, list(rows), metrics)
        return x

    def _round(self, kind: str, contents: dict[int, RecordDict], call: int, timeout: float
               ) -> tuple[dict[int, Message], float]:
        """Send contents[i] to agent i; (agent i's reply for every i, wall seconds from push
        to the last reply), or one FedscoreError naming the first agent that failed."""
        messages = [Message(c, dst_node_id=self.agents[i].node, message_type=kind,
                            group_id=str(call)) for i, c in contents.items()]
        t0 = time.perf_counter()
        replies, failures = exchange(self.grid, messages, timeout, self.poll)
        wall = time.perf_counter() - t0
        for i in contents:
            a = self.agents[i]
            if a.node in failures:
                raise FedscoreError(f"agent {a.index} ({a.name}, node {a.node}) failed at "
                                    f"call {call}: {_failure(failures[a.node])}")
        return {i: replies[self.agents[i].node] for i in contents}, wall

    def _checked(self, i: int, call: int, check, reply: Message, *args):
        """check(reply, i, call, *args), its failure one FedscoreError naming agent i."""
        a = self.agents[i]
        try:
            return check(reply, i, call, *args)
        except Exception as err:  # hostile bytes may raise anything: this reply's fault
            raise FedscoreError(f"agent {a.index} ({a.name}, node {a.node}) sent a bad "
                                f"reply at call {call}: {_reason(err)}") from None

    def _log(self, kind: str, call: int, wall: float, asked: list[int], metrics: list[dict]
             ) -> None:
        self.log.records.append({
            "call": call, "kind": kind, "seconds": wall, "agents": asked,
            "score_seconds": [m.get("score-seconds") for m in metrics],
            "process_age_seconds": [m.get("process-age-seconds") for m in metrics]})


def _arrays(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                        for k, v in tensors.items()})


def describe_reply(reply: Message, node: int, k: int) -> Agent:
    """An agent from node `node`'s describe reply, checked (index in 0..k-1, a config,
    non-negative class counts)."""
    try:
        rec = reply.content["agent"]
        index, name = int(rec["agent"]), str(rec["name"])
        counts = json.loads(str(rec["class-counts"]))
        if not (isinstance(counts, list) and counts
                and all(type(c) is int and c >= 0 for c in counts) and sum(counts) > 0):
            raise FedscoreError("class counts must be a non-empty list of non-negative "
                                "integers with a positive sum")
        config = config_from_text(str(rec["config"]), f"node {node}'s agent config")
        signature = json.loads(str(rec["signature"]))
        if not isinstance(signature, dict):
            raise FedscoreError("its signature must be a JSON object")
        diffusers = rec["diffusers"]
        if not isinstance(diffusers, bool):
            raise FedscoreError("'diffusers' must be true or false")
    except Exception as err:
        raise FedscoreError(f"SuperNode {node} described its agent wrongly: {_reason(err)}"
                            ) from None
    if not 0 <= index < k:
        raise FedscoreError(f"SuperNode {node} holds agent {index}, but this run has {k} "
                            f"agents (0..{k - 1}): check its partition-id")
    return Agent(index, node, name, config, counts, signature, diffusers)


def check_described(agents: list[Agent]) -> None:
    """The described agents (in index order) agree as `load_agents` requires of the same
    folders on one machine (`experiments.agents.check_agree`): their settings, or, when any
    is a diffusers folder, their signatures."""
    signatures = ([a.signature for a in agents] if any(a.diffusers for a in agents)
                  else None)
    check_agree([f"agent {a.index} ({a.name})" for a in agents], [a.config for a in agents],
                signatures)


def bind(described: list[Agent], k: int) -> list[Agent]:
    """The agents in index order: every index 0..k-1 held by exactly one node."""
    by_index: dict[int, list[Agent]] = {}
    for a in described:
        by_index.setdefault(a.index, []).append(a)
    for i in range(k):
        held = by_index.get(i, [])
        if len(held) != 1:
            nodes = sorted(a.node for a in held)
            raise FedscoreError(f"agent {i} is held by {len(held)} SuperNodes {nodes}; each "
                                "agent must be on exactly one (partition-id = its index)")
    return [by_index[i][0] for i in range(k)]


def check_score(reply: Message, index: int, call: int, shape: tuple[int, ...]
                ) -> tuple[Tensor, dict]:
    """Agent `index`'s scores of call `call` for x of `shape`: exactly the records
    {scores, call, metrics}, the reply's agent and call numbers, one float32 array "score"
    of x's shape (its byte size checked before numpy decodes it), finite values."""
    arrays, metrics = _reply_records(reply, "scores", index, call, ["score"])
    return torch.from_numpy(_checked_array(arrays, "score", "float32", shape)), metrics


def check_samples(reply: Message, index: int, call: int, rows: Tensor,
                  shape: tuple[int, ...]) -> tuple[Tensor, dict]:
    """Agent `index`'s route samples of call `call`: exactly the records {samples, call,
    metrics}, the reply's agent and call numbers, the arrays "x" (float32 of `shape`, finite:
    the rows' samples) and "rows" (int64, exactly the `rows` it was sent, in order)."""
    arrays, metrics = _reply_records(reply, "samples", index, call, ["rows", "x"])
    echoed = _checked_array(arrays, "rows", "int64", (len(rows),))
    if not np.array_equal(echoed, rows.numpy()):
        raise FedscoreError("its samples are of other rows than it was sent")
    return torch.from_numpy(_checked_array(arrays, "x", "float32", shape)), metrics


def _reply_records(reply: Message, record: str, index: int, call: int, keys: list[str]
                   ) -> tuple[ArrayRecord, dict]:
    """The reply's array record `record` (exactly `keys`) and its metrics, after checking
    that it holds exactly {record, call, metrics} and is marked agent `index`, call `call`."""
    content = reply.content
    if set(content.keys()) != {record, "call", "metrics"}:
        raise FedscoreError(f"records {sorted(content.keys())}, expected call, metrics, "
                            f"{record}")
    meta = content["call"]
    if int(meta["agent"]) != index or int(meta["call"]) != call:
        raise FedscoreError(f"it is marked agent {meta['agent']}, call {meta['call']}")
    arrays = content[record]
    if sorted(arrays.keys()) != keys:
        raise FedscoreError(f"arrays {list(arrays.keys())}, expected "
                            + (f"one {keys[0]!r}" if len(keys) == 1 else ", ".join(keys)))
    metrics = {k: float(v) for k, v in content["metrics"].items()}
    return arrays, metrics


def _checked_array(arrays: ArrayRecord, key: str, dtype: str, shape: tuple[int, ...]
                   ) -> np.ndarray:
    """arrays[key] as a writable little-endian numpy array of `dtype` and `shape` with finite
    values; its declared size, and its byte length, checked before numpy decodes it."""
    arr = arrays[key]
    want = np.dtype(dtype).newbyteorder("<")
    size = int(np.prod(shape)) * want.itemsize
    if tuple(arr.shape) != shape or arr.dtype != dtype or len(arr.data) > size + NPY_HEADER:
        raise FedscoreError(f"{key} {arr.dtype} {tuple(arr.shape)} ({len(arr.data)} bytes), "
                            f"expected {dtype} {shape}")
    values = arr.numpy()
    if values.dtype != want or values.shape != shape:
        raise FedscoreError(f"the {key}'s bytes hold {values.dtype} {values.shape}, "
                            f"expected {dtype} {shape}")
    if not np.isfinite(values).all():
        raise FedscoreError(f"the {key} values are not all finite")
    return np.array(values)


def _failure(why: str) -> str:
    """A failed reply's reason without Flower's wrapping: `exchange` gives "error 2:
    <class 'X'>:<'text'>" for an exception the ClientApp raised; the text is what says why."""
    found = re.fullmatch(r"error \d+: <class '[\w.]+'>:<'(.*)'>", why, flags=re.DOTALL)
    return found.group(1) if found else why


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split())[:300]
    return text if isinstance(err, FedscoreError) else f"{type(err).__name__}: {text}"
