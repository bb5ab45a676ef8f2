"""SecAgg+ rounds without Flower's processes: a Grid whose SuperNodes are calls of the real
ClientApp (with its `secaggplus_mod`) in this process, each node with its own context
state, messages copied on the way as the SuperLink's serialisation would. A node can be
made to die at a SecAgg+ stage (its reply is an error, as Flower sends for a crashed
ClientApp)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import time

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedscore.flower import client_app


class LocalGrid:
    """N SuperNodes (node ids 101, 102, ...; partition-id n) answering in this process."""

    def __init__(self, workers: int, die: dict[int, str] | None = None):
        self.node_of = {101 + n: n for n in range(workers)}
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": n, "num-partitions": workers})
            for node, n in self.node_of.items()}
        self.die = dict(die or {})  # partition id -> the SecAgg+ stage it dies at
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    def get_node_ids(self):
        return list(self.node_of)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            node = m.metadata.dst_node_id
            meta = Metadata(run_id=1, message_id=mid, src_node_id=0, dst_node_id=node,
                            reply_to_message_id="", group_id=m.metadata.group_id,
                            created_at=time.time(), ttl=600.0,
                            message_type=m.metadata.message_type)
            msg = Message(copy.deepcopy(m.content), metadata=meta)
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs[Key.STAGE] if configs is not None else None
            if self.die.get(self.node_of[node]) == stage:
                reply = Message(Error(0, "killed"), reply_to=msg)
            else:
                try:
                    reply = client_app.app(msg, self.contexts[node])
                except Exception as err:  # what the SuperNode sends for a failed ClientApp
                    reply = Message(Error(0, f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[mid] = Message(copy.deepcopy(reply.content), reply_to=msg) \
                if not reply.has_error() else reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


@contextlib.contextmanager
def server_identity():
    """Flower's ServerApp process sets who it is (`TaskIdentity`) before `main` runs; new
    messages read it. The same here, undone afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before
