"""Calling the ClientApp's `train` in this process, without Flower's processes: a message as
the server's transport builds it (metadata set by hand, as the SuperLink would), and the
reply read back as the server reads it."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedscore.config import dump_config
from fedscore.flower import client_app
from fedscore.flower.records import flat_record


def message(content: dict | RecordDict, kind: str, q: int = 0) -> Message:
    """A message of type `kind` (round q's) with its metadata set by hand, as the SuperLink
    would."""
    meta = Metadata(run_id=1, message_id=f"m{q}", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id=str(q), created_at=time.time(),
                    ttl=600.0, message_type=kind)
    return Message(RecordDict(content), metadata=meta)


def train_message(cfg, params, q: int) -> Message:
    return message({"global": flat_record(params),
                    "settings": ConfigRecord({"config": dump_config(cfg), "round": q})},
                   MessageType.TRAIN, q)


def client_round(cfg, params, q: int, node_config: dict, state: RecordDict | None = None
                 ) -> Message:
    """The ClientApp's reply to round q's message (node_config as the SuperNode passes it)."""
    context = Context(run_id=1, node_id=1, node_config=dict(node_config),
                      state=state if state is not None else RecordDict(), run_config={})
    return client_app.train(train_message(cfg, params, q), context)
