"""The Flower transport of the round loop (`federated.loop.Transport`): one round is one
push of theta_q to every connected SuperNode and a bounded pull of their replies, each
reply checked against what its worker was sent and then added into eq. 8's running sums
and counts (`payload.add_to_sums`, never a dense copy of a pruned worker's model).

Why our own push/pull rather than `flwr.serverapp.strategy.FedAvg`: the strategy's loop
knows nothing of masks or degraded rounds, its `send_and_receive` polls every 3 s and drops
the id of a message whose node died; here the message -> node map is kept and replies are
polled every `poll` seconds.

A reply is dropped, its reason logged with the round, and the round goes on without it when:
its Flower message carries an error (the node died, its ClientApp raised), it arrives after
`round_timeout`, its worker id is out of range or already answered, or its payload does not
fit the model it was sent (wrong sizes, unknown mask kinds, non-finite values).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.federated.loop import RoundOutcome
from fedscore.federated.setup import ModelSetup
from fedscore.flower import payload
from fedscore.flower.records import flat_record, record_to_numpy

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
class FlowerTransport:
    """Rounds over the SuperNodes of `grid`. config_text: the resolved fedscore config every
    worker builds its setup from; setup: the server's data-free model setup (random masks are
    regenerated from their seeds, nothing about them is sent)."""

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

    def run_round(self, q: int, params: Params) -> RoundOutcome:
        fed = self.setup.fed
        t0 = time.perf_counter()
        wait = self.start_wait if self._first else self.node_wait
        self._first = False
        nodes = wait_for_nodes(self.grid, self.min_nodes or fed.workers, wait, self.poll)
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

        sums = {k: torch.zeros_like(v) for k, v in params.items()}
        counts = {k: torch.zeros(v.shape, dtype=torch.long) for k, v in params.items()}
        masks, arrived, losses, up, train_s, start_s, devices = [], [], [], [], [], [], []
        for node, reply in sorted(replies.items()):
            try:
                pid, arrays, kinds, loss, seconds = self._read(reply, q, params, arrived)
                start = float(reply.content["metrics"].get("process-age-seconds", float("nan")))
                regen = None
                if fed.policy == "random":  # seeded masks: regenerate, nothing was sent
                    regen = {k: v[0] for k, v in self.setup.masks(params, q, [pid]).items()}
                masks.append(payload.add_to_sums(sums, counts, arrays, kinds, regen))
            except (FedscoreError, KeyError, ValueError, TypeError) as err:
                failures[node] = f"reply rejected: {err}"
                continue
            arrived.append(pid)
            losses.append(loss)
            train_s.append(seconds)
            start_s.append(start)
            up.append(payload.nbytes(arrays))
            devices.append(_runtime_of(reply))

        dense = sum(v.numel() * v.element_size() for v in params.values())
        record = {
            "replies": len(arrived), "workers": sorted(arrived),
            "missing_workers": sorted(set(range(fed.workers)) - set(arrived)),
            "failed": {str(k): v for k, v in failures.items()},
            "degraded": len(arrived) < len(nodes) or len(nodes) < fed.workers,
            "seconds_replies": t_replies, "worker_train_seconds": train_s,
            "worker_startup_seconds": start_s, "worker_devices": devices,
            "overhead_seconds": t_replies - max(train_s, default=0.0),
            "bytes_up": up, "bytes_up_total": sum(up), "bytes_down_total": dense * len(nodes),
            "bytes_dense_fedavg_up_total": dense * len(arrived),
        }
        enough = len(arrived) >= self.min_replies
        return RoundOutcome(sums=sums if enough else None, counts=counts if enough else None,
                            masks=masks, workers=arrived, worker_loss=losses, record=record)

    def _read(self, reply: Message, q: int, params: Params, arrived: list[int]):
        """(worker id, payload arrays, mask kinds, loss, train seconds) of a reply, checked
        against what its worker was sent: a FedscoreError names what does not fit."""
        meta = reply.content["meta"]
        pid = int(meta["partition-id"])
        if not 0 <= pid < self.setup.fed.workers:
            raise FedscoreError(f"partition-id {pid} is not a worker of this run")
        if pid in arrived:
            raise FedscoreError(f"duplicate partition-id {pid}")
        if int(meta["round"]) != q:
            raise FedscoreError(f"answers round {int(meta['round']) + 1}, not {q + 1}")
        arrays = record_to_numpy(reply.content["payload"])
        if not np.isfinite(arrays["values"]).all():
            raise FedscoreError("non-finite values")
        kinds = json.loads(str(meta["kinds"]))
        metrics = reply.content["metrics"]
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FedscoreError(f"non-finite loss {loss}")
        return pid, arrays, kinds, loss, float(metrics.get("train-seconds", float("nan")))


def _runtime_of(reply: Message) -> str:
    """"device/precision" a worker trained on, as its reply says ("" from older workers)."""
    if "runtime" not in reply.content:
        return ""
    rt = reply.content["runtime"]
    return f"{rt.get('device', '?')}/{rt.get('precision', '?')}"
