"""Every Flower reply is checked against what its worker was sent before it touches eq. 8's
sums (issue 16): each hostile or malformed reply below is built from a real honest reply
(the ClientApp's `train`, called in-process) and run through the transport's round step
(`FlowerTransport.collect`) beside an honest one. The hostile reply must be dropped with a
reason that names its problem, and the round's sums and counts must be the honest reply's
alone (the model unharmed)."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedscore.config import dump_config, load_config
from fedscore.federated.setup import model_setup
from fedscore.flower import payload, validate
from fedscore.flower.records import record_to_numpy
from fedscore.flower.transport import FlowerTransport

sys.path.insert(0, str(Path(__file__).parents[1] / "flower"))
from clientapp_harness import client_round  # noqa: E402

HONEST, HOSTILE, STRANGER = 1, 2, 3  # node ids: HONEST answers for worker 0, HOSTILE for 1
NORM = 20.0  # federation.max_update_norm: an honest update of these runs is ~2


def config(policy: str, norm: float | None = NORM):
    # level M: worker 0 keeps everything, worker 1 keeps 80% of each tensor
    return load_config(
        name="replies", seed=3, data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}}, diffusion={"steps": 20},
        federation={"workers": 2, "rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 1e-2,
                    "policy": policy, "level": "M", "strategy": "sequential",
                    "max_update_norm": norm})


class Round:
    """Round 0 of a 2-worker run: theta_0, the honest replies of both workers, and a
    transport whose nodes HONEST and HOSTILE are bound to workers 0 and 1 (as after an
    honest first round)."""

    def __init__(self, policy: str, norm: float | None = NORM):
        self.cfg = config(policy, norm)
        self.setup = model_setup(self.cfg)
        self.params = self.setup.init_params
        self.transport = FlowerTransport(None, self.setup, dump_config(self.cfg))
        self.transport._node_of.update({0: HONEST, 1: HOSTILE})
        self.transport._partition_of.update({HONEST: 0, HOSTILE: 1})

    def reply(self, pid: int) -> Message:
        """A fresh honest reply of worker pid (its own records: corrupting one is safe)."""
        return client_round(self.cfg, self.params, 0, {"partition-id": pid,
                                                       "num-partitions": 2})

    def collect(self, replies: dict[int, Message], nodes=(HONEST, HOSTILE, STRANGER)):
        return self.transport.collect(0, self.params, list(nodes), replies, {})


def with_records(reply: Message, **records) -> Message:
    """The reply with some records replaced (None: removed)."""
    content = {k: v for k, v in reply.content.items()}
    for k, v in records.items():
        content.pop(k, None) if v is None else content.__setitem__(k, v)
    return Message(RecordDict(content), metadata=copy.copy(reply.metadata))


def with_arrays(reply: Message, **arrays) -> Message:
    """The reply with payload arrays replaced (numpy arrays or Flower Arrays; None: removed)."""
    have = dict(reply.content["payload"].items())
    for k, v in arrays.items():
        have.pop(k, None) if v is None else have.__setitem__(
            k, v if isinstance(v, Array) else Array(v))
    return with_records(reply, payload=ArrayRecord(have))


def with_meta(reply: Message, **meta) -> Message:
    """The reply with meta fields replaced (None: removed); `kinds` may be a dict."""
    have = dict(reply.content["meta"].items())
    for k, v in meta.items():
        k = k.replace("_", "-")
        if v is None:
            have.pop(k, None)
        else:
            have[k] = json.dumps(v) if isinstance(v, dict) else v
    return with_records(reply, meta=ConfigRecord(have))


def with_metrics(reply: Message, **metrics) -> Message:
    have = dict(reply.content["metrics"].items())
    for k, v in metrics.items():
        have.pop(k, None) if v is None else have.__setitem__(k, v)
    return with_records(reply, metrics=MetricRecord(have))


def values(reply: Message) -> np.ndarray:
    return record_to_numpy(reply.content["payload"])["values"].copy()


def mask(reply: Message) -> np.ndarray:
    return record_to_numpy(reply.content["payload"])["mask"].copy()


def kinds(reply: Message) -> dict:
    return json.loads(reply.content["meta"]["kinds"])


def set_value(reply, at, x):
    v = values(reply)
    v[at] = x
    return with_arrays(reply, values=v)


def claimed_full(r: Round, reply: Message) -> Message:
    """A pruned worker claims to have kept everything and sends 1e3 everywhere."""
    dense = sum(p.numel() for p in r.params.values())
    everything = {k: payload.FULL for k in kinds(reply)}
    return with_meta(with_arrays(reply, values=np.full(dense, 1e3, np.float32), mask=None),
                     kinds=everything)


def other_topk_mask(r: Round, reply: Message) -> Message:
    """A mask of the right size and kept count that is not theta_q's top-k: the first
    pruned tensor's mask reversed (the same number of bits, other coordinates)."""
    names = sorted(r.params)
    bits = np.unpackbits(mask(reply))
    first = next(k for k in names if kinds(reply)[k] == payload.BITS)
    n = r.params[first].numel()
    bits[:n] = bits[:n][::-1]
    return with_arrays(reply, mask=np.packbits(bits[:sum(
        r.params[k].numel() for k in names if kinds(reply)[k] == payload.BITS)]))


def one_more_kept(r: Round, reply: Message) -> Message:
    """A top-k mask keeping one coordinate more than k, with one value more to match."""
    bits = np.unpackbits(mask(reply))
    bits[int(np.flatnonzero(bits == 0)[0])] = 1
    n_bits = sum(r.params[k].numel() for k, v in kinds(reply).items() if v == payload.BITS)
    return with_arrays(reply, mask=np.packbits(bits[:n_bits]),
                       values=np.append(values(reply), np.float32(0.5)))


def npy_bytes(a: np.ndarray, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


# (case, how worker 1's honest reply is corrupted, words its drop reason must contain)
CASES = [
    ("nan value", lambda r, m: set_value(m, 3, np.nan), "non-finite values"),
    ("inf value", lambda r, m: set_value(m, 0, np.inf), "non-finite values"),
    ("-inf value", lambda r, m: set_value(m, -1, -np.inf), "non-finite values"),
    ("1e30 value", lambda r, m: set_value(m, 5, 1e30), "max_update_norm"),
    ("3e38 value: overflows the sum", lambda r, m: set_value(m, 5, 3e38), "overflow"),
    ("values x1000", lambda r, m: with_arrays(m, values=values(m) * 1000), "max_update_norm"),
    ("values x10", lambda r, m: with_arrays(m, values=values(m) * 10), "max_update_norm"),
    ("int32 values", lambda r, m: with_arrays(m, values=values(m).astype(np.int32)), "int32"),
    ("int64 values", lambda r, m: with_arrays(m, values=values(m).astype(np.int64)), "int64"),
    ("bool values", lambda r, m: with_arrays(m, values=values(m) > 0), "bool"),
    ("float64 values", lambda r, m: with_arrays(m, values=values(m).astype(np.float64)), "float64"),
    ("float16 values", lambda r, m: with_arrays(m, values=values(m).astype(np.float16)), "float16"),
    ("big-endian values", lambda r, m: with_arrays(m, values=values(m).astype(">f4")), ">f4"),
    ("2-D values", lambda r, m: with_arrays(m, values=values(m)[None]), "shape (1,"),
    ("empty values", lambda r, m: with_arrays(m, values=values(m)[:0]), "shape (0,)"),
    ("one value short", lambda r, m: with_arrays(m, values=values(m)[:-1]), "the masks keep"),
    ("one value extra", lambda r, m: with_arrays(m, values=np.append(values(m), np.float32(1))),
     "the masks keep"),
    ("50 M values", lambda r, m: with_arrays(m, values=np.zeros(50_000_000, np.float32)),
     "holds 200000128 bytes"),
    ("values not .npy bytes", lambda r, m: with_arrays(m, values=Array(
        "float32", (4,), "numpy.ndarray", b"\x00garbage")), "not a numpy array"),
    ("values of another serialisation", lambda r, m: with_arrays(m, values=Array(
        "float32", (4,), "torch", b"\x00" * 16)), "not a numpy array"),
    ("pickled object values", lambda r, m: with_arrays(m, values=Array(
        "object", (2,), "numpy.ndarray", npy_bytes(np.array([1, "x"], object), True))),
     "not a numpy array"),
    ("mask one byte short", lambda r, m: with_arrays(m, mask=mask(m)[:-1]), "uint8 of shape"),
    ("mask one byte long", lambda r, m: with_arrays(m, mask=np.append(mask(m), np.uint8(0))),
     "uint8 of shape"),
    ("float mask", lambda r, m: with_arrays(m, mask=mask(m).astype(np.float32)), "float32"),
    ("missing mask", lambda r, m: with_arrays(m, mask=None), "has no mask"),
    ("claimed full mask filled with 1e3", claimed_full, "at keep ratio 0.8 makes it 'bits'"),
    ("top-k worker sends another mask", other_topk_mask, "not theta_q's top-k"),
    ("top-k mask keeps one too many", one_more_kept, "top-k at keep ratio 0.8 keeps"),
    ("seeded claim for a top-k mask", lambda r, m: with_meta(m, kinds={
        k: payload.SEEDED if v == payload.BITS else v for k, v in kinds(m).items()}),
     "is 'seeded'"),
    ("unknown mask kind", lambda r, m: with_meta(m, kinds={
        k: "dense" if v == payload.BITS else v for k, v in kinds(m).items()}), "'dense'"),
    ("non-JSON kinds", lambda r, m: with_meta(m, kinds="{full"), "not JSON"),
    ("kinds a JSON list", lambda r, m: with_meta(m, kinds="[1, 2]"), "not a JSON object"),
    ("kinds not text", lambda r, m: with_meta(m, kinds=7), "not a JSON text"),
    ("kinds of 1 MB", lambda r, m: with_meta(m, kinds=" " * 2**20), "not a JSON text"),
    ("kinds missing a tensor", lambda r, m: with_meta(m, kinds={
        k: v for k, v in kinds(m).items() if k != "out.bias"}), "missing ['out.bias']"),
    ("kinds naming an unknown tensor", lambda r, m: with_meta(m, kinds=kinds(m) | {
        "evil.weight": "full"}), "unknown ['evil.weight']"),
    ('partition-id "abc"', lambda r, m: with_meta(m, partition_id="abc"), "not an integer"),
    ("partition-id 99", lambda r, m: with_meta(m, partition_id=99), "not a worker"),
    ("partition-id -1", lambda r, m: with_meta(m, partition_id=-1), "not a worker"),
    ("partition-id True", lambda r, m: with_meta(m, partition_id=True), "not an integer"),
    ("partition-id 1.0", lambda r, m: with_meta(m, partition_id=1.0), "not an integer"),
    ("node bound to worker 1 claims worker 0", lambda r, m: r.reply(0),
     "bound to partition-id 1"),
    ("wrong round", lambda r, m: with_meta(m, round=1), "answers round 2, not round 1"),
    ("round as text", lambda r, m: with_meta(m, round="0"), "round '0' is not an integer"),
    ("missing meta", lambda r, m: with_records(m, meta=None), "no record(s) ['meta']"),
    ("meta without partition-id", lambda r, m: with_meta(m, partition_id=None),
     "no ['partition-id']"),
    ("meta with an extra key", lambda r, m: with_meta(m, extra=1), "unexpected key(s)"),
    ("missing metrics", lambda r, m: with_records(m, metrics=None), "['metrics']"),
    ("missing loss", lambda r, m: with_metrics(m, loss=None), "no ['loss']"),
    ("nan loss", lambda r, m: with_metrics(m, loss=float("nan")), "non-finite loss"),
    ("inf loss", lambda r, m: with_metrics(m, loss=float("inf")), "non-finite loss"),
    ("loss as a list", lambda r, m: with_metrics(m, loss=[1.0, 2.0]), "is not a number"),
    ("unknown metric", lambda r, m: with_metrics(m, evil=1.0), "unexpected key(s)"),
    ("metrics as a ConfigRecord", lambda r, m: with_records(
        m, metrics=ConfigRecord({"loss": 0.1})), "not a MetricRecord"),
    ("extra record", lambda r, m: with_records(m, evil=ConfigRecord({"x": 1})),
     "unexpected record(s) ['evil']"),
    ("missing payload", lambda r, m: with_records(m, payload=None), "['payload']"),
    ("extra payload array", lambda r, m: with_arrays(m, evil=np.zeros(3, np.float32)),
     "unexpected key(s) ['evil']"),
    ("runtime of 1 MB", lambda r, m: with_records(m, runtime=ConfigRecord(
        {"device": "x" * 2**20, "precision": "fp32"})), "64 characters"),
]


@pytest.fixture(scope="module")
def topk():
    return Round("topk")


@pytest.fixture(scope="module")
def alone(topk):
    """The round with worker 0's honest reply alone: what every hostile round must equal."""
    return topk.collect({HONEST: topk.reply(0)})


def assert_unharmed(out, alone):
    assert out.workers == [0]
    assert out.record["degraded"]
    for k in alone.sums:
        assert torch.equal(out.sums[k], alone.sums[k]), k
        assert torch.equal(out.counts[k], alone.counts[k]), k


@pytest.mark.parametrize("case,corrupt,words", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_reply_is_dropped_and_the_sums_are_the_honest_replys(
        topk, alone, case, corrupt, words):
    hostile = corrupt(topk, topk.reply(1))
    out = topk.collect({HONEST: topk.reply(0), HOSTILE: hostile})
    reason = out.record["failed"][str(HOSTILE)]
    assert reason.startswith("reply rejected: ") and words in reason, reason
    assert_unharmed(out, alone)


def test_a_stranger_claiming_a_bound_worker_is_dropped_and_the_owner_kept(topk, alone):
    """An unbound node replays worker 0's reply while worker 0's node is connected."""
    out = topk.collect({HONEST: topk.reply(0), STRANGER: topk.reply(0)})
    assert "partition-id 0 is bound to node 1, which is still connected" in (
        out.record["failed"][str(STRANGER)])
    assert_unharmed(out, alone)


def test_a_random_worker_must_send_its_seed_not_bits_or_a_full_mask():
    """A random worker's mask is regenerated from its seed; one that sends bits (even the
    true ones) or claims a full mask is dropped."""
    r = Round("random")
    honest = r.reply(1)
    bits = Round("topk").reply(1)  # a payload with packed bits of the right size
    forged = with_meta(with_arrays(honest, mask=mask(bits)), kinds=kinds(bits))
    alone = r.collect({HONEST: r.reply(0)})
    for bad, words in [(forged, "is 'bits', but policy 'random'"),
                       (claimed_full(r, honest), "makes it 'seeded'")]:
        out = r.collect({HONEST: r.reply(0), HOSTILE: bad})
        assert words in out.record["failed"][str(HOSTILE)]
        assert_unharmed(out, alone)


def test_a_full_policy_worker_must_keep_everything():
    r = Round("full")
    pruned = Round("topk").reply(1)
    out = r.collect({HONEST: r.reply(0), HOSTILE: pruned})
    assert "but policy 'full' at keep ratio 0.8 makes it 'full'" in (
        out.record["failed"][str(HOSTILE)])
    assert_unharmed(out, r.collect({HONEST: r.reply(0)}))


@pytest.mark.parametrize("policy", ["full", "random", "topk"])
def test_honest_replies_give_the_sums_of_the_unchecked_path(policy):
    """Both honest workers accepted, not degraded, and eq. 8's sums and counts exactly
    those of `payload.add_to_sums` on the same replies (the path before these checks)."""
    r = Round(policy)
    replies = {HONEST: r.reply(0), HOSTILE: r.reply(1)}
    out = r.collect(replies, nodes=(HONEST, HOSTILE))
    assert out.workers == [0, 1] and not out.record["failed"] and not out.record["degraded"]
    sums = {k: torch.zeros_like(v) for k, v in r.params.items()}
    counts = {k: torch.zeros(v.shape, dtype=torch.long) for k, v in r.params.items()}
    for pid, reply in enumerate(replies.values()):
        regen = ({k: v[0] for k, v in r.setup.masks(r.params, 0, [pid]).items()}
                 if policy == "random" else None)
        payload.add_to_sums(sums, counts, record_to_numpy(reply.content["payload"]),
                            kinds(reply), regen)
    for k in sums:
        assert torch.equal(out.sums[k], sums[k]) and torch.equal(out.counts[k], counts[k])
    if policy != "full":  # worker 1 is pruned: some coordinate only worker 0 covers
        assert any(bool((c == 1).any()) for c in out.counts.values())


def test_without_a_norm_bound_a_finite_scaled_update_is_accepted():
    """max_update_norm is what catches finite hostile values: without it, x10 passes."""
    r = Round("topk", norm=None)
    out = r.collect({HONEST: r.reply(0), HOSTILE: with_arrays(r.reply(1), values=values(
        r.reply(1)) * 10)}, nodes=(HONEST, HOSTILE))
    assert out.workers == [0, 1]


def test_two_nodes_claiming_one_unbound_partition_are_both_dropped_then_one_binds():
    """The first-round rule: the server cannot tell which of two claimants is the worker,
    so neither is accepted nor bound; once one of them has left, the other binds."""
    r = Round("topk")
    r.transport._node_of.clear()
    r.transport._partition_of.clear()
    out = r.collect({HONEST: r.reply(0), STRANGER: r.reply(0), HOSTILE: r.reply(1)})
    assert out.workers == [1]
    for node in (HONEST, STRANGER):
        assert "claimed by nodes [1, 3] in one round" in out.record["failed"][str(node)]
    assert r.transport._node_of == {1: HOSTILE}
    out = r.collect({HONEST: r.reply(0), HOSTILE: r.reply(1)}, nodes=(HONEST, HOSTILE))
    assert out.workers == [0, 1] and r.transport._node_of == {0: HONEST, 1: HOSTILE}


def test_a_partition_whose_node_left_binds_to_the_next_claimant():
    r = Round("topk")
    out = r.collect({STRANGER: r.reply(0)}, nodes=(HOSTILE, STRANGER))  # HONEST is gone
    assert out.workers == [0] and r.transport._node_of[0] == STRANGER
    out = r.collect({HONEST: r.reply(0)}, nodes=(HONEST, HOSTILE, STRANGER))  # it is back
    assert "bound to node 3" in out.record["failed"][str(HONEST)]


def test_whatever_a_check_raises_drops_only_that_reply(topk, alone, monkeypatch):
    """A check that raises something unforeseen on worker 1's reply drops it, with the
    exception's type in the reason; worker 0's reply and the run go on."""
    real = validate.check_metrics

    def explode(metrics):
        if metrics["kept"] < sum(v.numel() for v in topk.params.values()):  # worker 1
            raise ZeroDivisionError("boom")
        return real(metrics)

    monkeypatch.setattr(validate, "check_metrics", explode)
    out = topk.collect({HONEST: topk.reply(0), HOSTILE: topk.reply(1)})
    assert out.record["failed"][str(HOSTILE)] == "reply rejected: ZeroDivisionError: boom"
    assert_unharmed(out, alone)


def test_the_case_count_covers_the_issue():
    """Issue 16 lists ~40 malformed or hostile replies; each is a case here."""
    assert len(CASES) >= 40
