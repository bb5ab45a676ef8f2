"""A hostile Flower ClientApp for tests/reliability/test_hostile_clientapp.py: the real
fedscore ClientApp (`fedscore.flower.client_app.train`), except that the node of partition 0
corrupts its honest reply, with another case of issue 16 each round (CASES[round]). Every
other node answers honestly. The app's pyproject points its clientapp component here
(`hostile_clientapp:app`); the test puts this folder on the PYTHONPATH of Flower's processes.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedscore.flower import client_app

app = ClientApp()
HOSTILE_PARTITION = 0


def _values(content) -> np.ndarray:
    return content["payload"]["values"].numpy().copy()


def _arrays(content, **arrays) -> ArrayRecord:
    have = {k: v for k, v in content["payload"].items()}
    for k, v in arrays.items():
        have.pop(k, None) if v is None else have.__setitem__(k, Array(v))
    return ArrayRecord(have)


def _meta(content, **meta) -> ConfigRecord:
    return ConfigRecord({**dict(content["meta"].items()), **meta})


def nan_value(c):
    v = _values(c)
    v[len(v) // 2] = np.nan
    return {"payload": _arrays(c, values=v)}


def scaled_1e30(c):
    return {"payload": _arrays(c, values=_values(c) * np.float32(1e30))}


def int_values(c):
    return {"payload": _arrays(c, values=_values(c).astype(np.int32))}


def wrong_count(c):
    return {"payload": _arrays(c, values=_values(c)[:-1])}


def claimed_full_mask(c):
    kinds = json.loads(c["meta"]["kinds"])
    dense = int(c["metrics"]["kept"] / 0.6) + 64  # any full-size guess: it is refused anyway
    return {"payload": _arrays(c, values=np.full(dense, 1e3, np.float32), mask=None),
            "meta": _meta(c, kinds=json.dumps(dict.fromkeys(kinds, "full")))}


def partition_99(c):
    return {"meta": _meta(c, **{"partition-id": 99})}


def non_json_kinds(c):
    return {"meta": _meta(c, kinds="{not json")}


def missing_loss(c):
    return {"metrics": MetricRecord({k: v for k, v in c["metrics"].items() if k != "loss"})}


# round q's corruption, and a word its drop reason in metrics.jsonl must contain
CASES = [
    (nan_value, "non-finite values"),
    (scaled_1e30, "max_update_norm"),
    (int_values, "int32"),
    (wrong_count, "the masks keep"),
    (claimed_full_mask, "makes it 'bits'"),
    (partition_99, "partition-id 99"),
    (non_json_kinds, "not JSON"),
    (missing_loss, "no ['loss']"),
]


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    if int(context.node_config["partition-id"]) != HOSTILE_PARTITION:
        return reply
    corrupt, _ = CASES[int(msg.content["settings"]["round"]) % len(CASES)]
    content = {k: v for k, v in reply.content.items()}
    return Message(RecordDict(content | corrupt(reply.content)), reply_to=msg)
