"""The Flower transport of the round loop (`federated.loop.Transport`): one round is one
push of theta_q to every connected SuperNode and a bounded pull of their replies, each
reply checked against what its worker was sent and then added into eq. 8's running sums
and counts (`payload.add_kept`, never a dense copy of a pruned worker's model).

Why our own push/pull rather than `flwr.serverapp.strategy.FedAvg`: the strategy's loop
knows nothing of masks or degraded rounds, its `send_and_receive` polls every 3 s and drops
the id of a message whose node died; here the message -> node map is kept and replies are
polled every `poll` seconds.

A reply is dropped, its reason logged with the round, and the round goes on without it when:
its Flower message carries an error (the node died, its ClientApp raised), it arrives after
`round_timeout`, it does not fit what its worker was sent (`flower.validate`: layout, sizes,
dtypes, masks against the worker's policy and keep ratio, finite values, the optional
update-norm bound), or its partition id is not its node's (`FlowerTransport.bind`). A reply
is checked whole before anything of it is added to the sums, and whatever a check raises
drops that reply only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.federated.loop import RoundOutcome
from fedscore.federated.setup import ModelSetup
from fedscore.flower import payload, validate
from fedscore.flower.records import flat_record
from fedscore.privacy import PrivacyPlan, clip_reply

Params = dict[str, Tensor]


def wait_for_nodes(grid: Grid, need: int, timeout: float, poll: float) -> list[int]:
    """Node ids once `need` are connected, or whatever is connected after `timeout` s
    (Flower's own wait has no timeout)."""
    end = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() >= end:
            return nodes
        time.sleep(poll)


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float
             ) -> tuple[dict[int, Message], dict[int, str]]:
    """Push messages, pull replies until all arrived or `timeout` s passed.

    Returns (replies by node id, failures by node id: an error reply's reason, or no reply
    in time). An error the SuperLink raises for a dead node carries the SuperLink's id as
    its source, so replies are mapped back to nodes through `reply_to_message_id`."""
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    failures = {m.metadata.dst_node_id: "could not be pushed"
                for mid, m in zip(ids, messages) if not mid}
    waiting, replies = set(node_of), {}
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        for reply in grid.pull_messages(list(waiting)):
            mid = reply.metadata.reply_to_message_id
            if mid not in waiting:
                continue
            waiting.discard(mid)
            node = node_of[mid]
            if reply.has_error():
                failures[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                replies[node] = reply
        if waiting:
            time.sleep(poll)
    failures |= {node_of[mid]: f"no reply within {timeout:g} s" for mid in waiting}
    return replies, failures


@dataclass
class FlowerRounds:
    """What every Flower transport shares (the plain one below, SecAgg+'s in
    secure_transport.py): the grid, the run's setup and config text, and the waits.
    config_text: the resolved fedscore config every worker builds its setup from; setup: the
    server's data-free model setup."""

    grid: Grid
    setup: ModelSetup
    config_text: str
    round_timeout: float = 600.0
    start_wait: float = 120.0
    node_wait: float = 10.0
    min_nodes: int = 0  # 0: all workers
    min_replies: int = 1
    poll: float = 0.5
    folder_hint: str = ""
    _first: bool = field(default=True, init=False)

    def connected(self) -> tuple[list[int], float]:
        """(the SuperNodes connected for this round, the seconds waited for them): the
        first round waits start_wait for all of them, later rounds node_wait."""
        wait = self.start_wait if self._first else self.node_wait
        self._first = False
        nodes = wait_for_nodes(self.grid, self.min_nodes or self.setup.fed.workers, wait,
                               self.poll)
        return nodes, wait


@dataclass
class FlowerTransport(FlowerRounds):
    """Rounds over the SuperNodes of `grid` (random masks are regenerated from their seeds,
    nothing about them is sent)."""

    privacy: PrivacyPlan | None = None
    """mode client, noise central: every accepted reply's update is clipped here, before
    eq. 8's sums (the loop adds the noise)."""
    # partition binding (`bind`): partition id -> node id and back, from accepted replies
    _node_of: dict[int, int] = field(default_factory=dict, init=False)
    _partition_of: dict[int, int] = field(default_factory=dict, init=False)

    def run_round(self, q: int, params: Params) -> RoundOutcome:
        t0 = time.perf_counter()
        nodes, wait = self.connected()
        if len(nodes) < self.min_replies:
            raise FedscoreError(
                f"round {q + 1}: only {len(nodes)} SuperNode(s) connected after {wait:g} s "
                f"(need {self.min_replies}); {self.folder_hint}start the SuperNodes and resume"
            )
        content = RecordDict({"global": flat_record(params),
                              "settings": ConfigRecord({"config": self.config_text, "round": q})})
        messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                            group_id=str(q)) for node in nodes]
        replies, failures = exchange(self.grid, messages, self.round_timeout, self.poll)
        t_replies = time.perf_counter() - t0
        return self.collect(q, params, nodes, replies, failures, t_replies)

    def expected(self, q: int, params: Params) -> validate.Expected:
        """What every reply of round q must fit (`flower.validate`)."""
        fed = self.setup.fed

        def regenerate(pid: int) -> Params:  # seeded masks: regenerated, nothing was sent
            return {k: v[0] for k, v in self.setup.masks(params, q, [pid]).items()}

        theta = {k: v.detach().to("cpu", torch.float32) for k, v in params.items()}
        return validate.Expected(q, theta, fed.policy, list(self.setup.ratios), regenerate,
                                 fed.max_update_norm)

    def collect(self, q: int, params: Params, nodes: list[int], replies: dict[int, Message],
                failures: dict[int, str], t_replies: float = 0.0) -> RoundOutcome:
        """Round q's outcome from the replies of `nodes` (the SuperNodes it was pushed to):
        every reply checked whole (`validate.check_reply`), partition ids checked against
        the nodes they are bound to (`bind`), and only then the accepted ones added into
        eq. 8's sums. A reply that fails is dropped with its reason in `failures`."""
        fed = self.setup.fed
        expect = self.expected(q, params)
        checked = {}
        for node, reply in sorted(replies.items()):
            try:
                checked[node] = validate.check_reply(reply, expect)
            except Exception as err:
                # hostile bytes may raise anything (numpy on a forged .npy header, Flower on
                # a foreign record); whatever it is, it is this reply's fault: drop it, log
                # why, keep the run going
                failures[node] = f"reply rejected: {_reason(err)}"
        accepted = self.bind(checked, nodes, failures)

        sums = {k: torch.zeros_like(v) for k, v in params.items()}
        counts = {k: torch.zeros(v.shape, dtype=torch.long) for k, v in params.items()}
        clipped = []
        for r in accepted:
            kept = r.kept
            if self.privacy is not None:
                kept, was = clip_reply(self.privacy, r.kept, r.masks, expect.theta)
                clipped.append(was)
            payload.add_kept(sums, counts, r.masks, kept)
        arrived = [r.pid for r in accepted]
        up = [r.nbytes for r in accepted]
        train_s = [r.train_seconds for r in accepted]
        dense = sum(v.numel() * v.element_size() for v in params.values())
        record = {
            "replies": len(arrived), "workers": sorted(arrived),
            "missing_workers": sorted(set(range(fed.workers)) - set(arrived)),
            "failed": {str(k): v for k, v in failures.items()},
            "degraded": len(arrived) < len(nodes) or len(nodes) < fed.workers,
            "seconds_replies": t_replies, "worker_train_seconds": train_s,
            "worker_startup_seconds": [r.startup_seconds for r in accepted],
            "worker_devices": [r.device for r in accepted],
            "overhead_seconds": t_replies - max(train_s, default=0.0),
            "bytes_up": up, "bytes_up_total": sum(up), "bytes_down_total": dense * len(nodes),
            "bytes_dense_fedavg_up_total": dense * len(arrived),
        }
        if clipped:
            record["clipped_fraction"] = sum(clipped) / len(clipped)
        record |= reported_epsilons(accepted)
        enough = len(arrived) >= self.min_replies
        return RoundOutcome(sums=sums if enough else None, counts=counts if enough else None,
                            masks=[r.masks for r in accepted], workers=arrived,
                            worker_loss=[r.loss for r in accepted], record=record)

    def bind(self, checked: dict[int, validate.Checked], nodes: list[int],
             failures: dict[int, str]) -> list[validate.Checked]:
        """The replies whose partition id belongs to their node, in node order; the others
        go to `failures`. A node is bound to the partition of its first accepted reply and
        keeps it: a node claiming another partition is dropped, and so is a node claiming a
        partition bound to another node that is still connected (an impersonator cannot
        push the honest worker out). When several nodes claim one unbound partition in the
        same round, none of them is accepted or bound (the server cannot tell which is the
        worker); a partition whose node has left is bound to the next node that claims it.
        Only SuperNode authentication (`--auth`) keeps unknown nodes out altogether."""
        claims: dict[int, list[int]] = {}
        for node, r in checked.items():
            bound = self._partition_of.get(node)
            if bound is not None and bound != r.pid:
                failures[node] = (f"reply rejected: node {node} is bound to partition-id "
                                  f"{bound}, its reply claims {r.pid}")
            else:
                claims.setdefault(r.pid, []).append(node)
        accepted = []
        for pid, claimers in sorted(claims.items()):
            owner = self._node_of.get(pid)
            if owner is not None and owner not in nodes:  # left the federation: unbind
                del self._node_of[pid], self._partition_of[owner]
                owner = None
            if owner is not None:
                winners = [n for n in claimers if n == owner]
                why = f"partition-id {pid} is bound to node {owner}, which is still connected"
            elif len(claimers) == 1:
                winners = claimers
            else:
                winners = []
                why = (f"partition-id {pid} claimed by nodes {sorted(claimers)} in one round; "
                       "none is bound to it, none is accepted")
            for node in claimers:
                if node not in winners:
                    failures[node] = f"reply rejected: {why}"
            for node in winners:
                self._node_of[pid], self._partition_of[node] = node, pid
                accepted.append(checked[node])
        return sorted(accepted, key=lambda r: self._node_of[r.pid])


def reported_epsilons(accepted) -> dict:
    """privacy mode sample on Flower: each worker accounts its own DP-SGD (it alone knows its
    data's size) and reports its epsilon; the round records them and their maximum, marked
    as the workers' reports."""
    eps = {str(r.pid): r.epsilon for r in accepted if r.epsilon is not None}
    if not eps:
        return {}
    return {"epsilon": max(eps.values()), "worker_epsilon_reported": eps}


def _reason(err: Exception) -> str:
    """One line for the round record: our own message, or the exception's type and text."""
    text = " ".join(str(err).split())[:300]
    return text if isinstance(err, FedscoreError) else f"{type(err).__name__}: {text}"
