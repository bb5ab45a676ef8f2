"""Federated inference on Flower: each agent on its own SuperNode (real SuperLink and
SuperNode processes, or Flower's simulation runtime), the server driving the in-process
sampler with the agents' scores fetched per step, or (`route`) each silo drawing its own
rows from one message. The samples equal `sample_agents`' for the same seed; every reply is
checked against what was sent, and a bad one stops sampling with one error naming the
agent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clientapp_harness import message
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    MetricRecord,
    RecordDict,
)
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import load_agents, train_agents
from fedscore.flower import fi_client_app
from fedscore.flower.fi_run import STATUS, fi_result, sample_agents_on
from fedscore.flower.fi_server_app import (
    Agent,
    RemoteAgents,
    bind,
    check_samples,
    check_score,
    describe_reply,
)
from fedscore.runs.evaluate import load_samples

SHAPE = (6, 2)  # x of the unit tests: 6 samples of the 2-D toy
FI_TOY = Path(__file__).parents[2] / "configs" / "fi-toy.yaml"


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Two fi-toy agents (configs/fi-toy.yaml: class-conditional MLPs on the 8-mode ring),
    trained 5 steps each: equality with the in-process sampler does not need good agents."""
    root = tmp_path_factory.mktemp("fi-agents")
    cfg = load_config(FI_TOY, out_dir=str(root),
                      train={"steps": 5, "checkpoint_every": 5, "log_every": 5})
    return train_agents(cfg, "heterogeneous", root / "het", n_agents=2, progress=False)


def in_process(dirs, out, aggregator, **kw):
    """The reference, on one thread as every SuperNode runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample_agents_on(dirs, out, aggregator=aggregator, **kw)
    finally:
        torch.set_num_threads(threads)


def assert_same_samples(got, want):
    a, la = load_samples(got["samples"], (2,))
    b, lb = load_samples(want["samples"], (2,))
    assert torch.equal(la, lb) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_runtime_samples_equal_the_in_process_mixture(agents, tmp_path):
    """`mixture` (per-class weights from the described class counts, densities tracked by
    the server's observer) with K = 2 virtual SuperNodes: the in-process samples."""
    pytest.importorskip("ray")
    kw = {"per_label": 2, "steps": 3, "seed": 5}
    want = in_process(agents, tmp_path / "ref", "mixture", **kw)
    got = sample_agents_on(agents, tmp_path / "sim", deployment="simulation",
                           aggregator="mixture", start_wait=120, step_timeout=300, **kw)
    assert_same_samples(got, want)
    status = json.loads((tmp_path / "sim" / STATUS).read_text())
    assert status["state"] == "finished" and status["agents"] == ["agent-00", "agent-01"]
    assert [c["call"] for c in status["calls"]] == [0, 1, 2]  # one exchange per step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loopback_supernodes_sample_like_in_process_through_the_cli(agents, tmp_path):
    """`fedscore agents sample A B --deployment loopback --aggregator hybrid`: two real
    SuperNodes, node i holding only agent i's folder; the in-process samples."""
    kw = {"per_label": 2, "steps": 2, "seed": 9}
    want = in_process(agents, tmp_path / "ref", "hybrid", **kw)
    out = tmp_path / "loop"
    result = CliRunner().invoke(app, [
        "agents", "sample", *map(str, agents), "--out", str(out), "--aggregator", "hybrid",
        "--per-label", "2", "--steps", "2", "--seed", "9", "--deployment", "loopback",
        "--step-timeout", "300"])
    assert result.exit_code == 0, result.output
    assert_same_samples({"samples": out / "samples.npz"}, want)
    # each SuperNode's node config named its own agent, nothing else
    home = out / "flower-home" / "logs"
    assert (home / "supernode0.log").is_file() and (home / "supernode1.log").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_agent_that_fails_on_its_silo_is_one_clear_error_naming_it(agents, tmp_path):
    """Agent 1's weights are unreadable on its SuperNode (real loopback processes): the CLI
    exits 2 with one line naming agent 1, and no samples are written."""
    import shutil

    dirs = [shutil.copytree(d, tmp_path / d.name) for d in agents]
    (dirs[1] / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "loop"
    result = CliRunner().invoke(app, [
        "agents", "sample", *map(str, dirs), "--out", str(out), "--steps", "2",
        "--per-label", "1", "--deployment", "loopback", "--step-timeout", "120"])
    assert isinstance(result.exception, FedscoreError), result.output
    assert "agent 1 (agent-01)" in str(result.exception)
    assert not (out / "samples.npz").exists()
    assert json.loads((out / STATUS).read_text())["state"] == "failed"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_route_on_the_simulation_runtime_is_one_message_per_silo_and_the_in_process_route(
        agents, tmp_path):
    """`route` with K = 2 virtual SuperNodes: the server draws the assignment, each silo
    samples its own rows from one query.route message (no per-step exchange), and the
    assembled samples are the in-process route's for the same seed."""
    pytest.importorskip("ray")
    kw = {"per_label": 2, "steps": 3, "seed": 4}
    want = in_process(agents, tmp_path / "ref", "route", **kw)
    got = sample_agents_on(agents, tmp_path / "sim", deployment="simulation",
                           aggregator="route", start_wait=120, step_timeout=300, **kw)
    assert_same_samples(got, want)
    (call,) = json.loads((tmp_path / "sim" / STATUS).read_text())["calls"]
    assert call["kind"] == "route" and call["agents"] == [0, 1]  # both silos had rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_route_on_loopback_supernodes_through_the_cli_is_the_in_process_route(agents,
                                                                             tmp_path):
    """`fedscore agents sample A B --deployment loopback --aggregator route`: two real
    SuperNodes, one message each; the in-process samples."""
    kw = {"per_label": 2, "steps": 3, "seed": 4}
    want = in_process(agents, tmp_path / "ref", "route", **kw)
    out = tmp_path / "loop"
    result = CliRunner().invoke(app, [
        "agents", "sample", *map(str, agents), "--out", str(out), "--aggregator", "route",
        "--per-label", "2", "--steps", "3", "--seed", "4", "--deployment", "loopback",
        "--step-timeout", "100"])
    assert result.exit_code == 0, result.output
    assert_same_samples({"samples": out / "samples.npz"}, want)
    (call,) = json.loads((out / STATUS).read_text())["calls"]
    assert call["kind"] == "route" and len(call["score_seconds"]) == len(call["agents"])


# ------------------------------------------------------------ what the server accepts


def score_reply(agent=0, call=3, values=None, extra=None, records=None):
    values = np.zeros(SHAPE, np.float32) if values is None else values
    content = {"scores": ArrayRecord({"score": Array(values)}),
               "call": ConfigRecord({"agent": agent, "call": call}),
               "metrics": MetricRecord({"score-seconds": 0.1})}
    content |= records or {}
    if extra is not None:
        content["scores"]["other"] = Array(extra)
    return message(content, "query.score")


def test_a_well_formed_score_reply_is_accepted_as_sent():
    values = np.arange(12, dtype=np.float32).reshape(SHAPE)
    s, metrics = check_score(score_reply(values=values), 0, 3, SHAPE)
    assert torch.equal(s, torch.from_numpy(values)) and metrics == {"score-seconds": 0.1}


@pytest.mark.parametrize("reply, why", [
    (score_reply(agent=1), "marked agent 1"),
    (score_reply(call=2), "call 2"),
    (score_reply(values=np.zeros((5, 2), np.float32)), r"expected float32 \(6, 2\)"),
    (score_reply(values=np.zeros(SHAPE, np.float64)), "float64"),
    (score_reply(values=np.zeros(SHAPE, ">f4")), "expected float32"),
    (score_reply(values=np.full(SHAPE, np.nan, np.float32)), "not all finite"),
    (score_reply(values=np.full(SHAPE, np.inf, np.float32)), "not all finite"),
    (score_reply(extra=np.zeros(3, np.float32)), "one 'score'"),
    (score_reply(records={"weights": ArrayRecord({})}), "records"),
])
def test_a_score_reply_that_does_not_fit_what_was_sent_is_refused(reply, why):
    with pytest.raises(FedscoreError, match=why):
        check_score(reply, 0, 3, SHAPE)


def test_forged_array_sizes_are_refused_before_numpy_reads_them():
    """An array whose header claims (6, 2) float32 but carries 1 MB of bytes."""
    forged = Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=b"\0" * 2**20)
    reply = score_reply()
    reply.content["scores"]["score"] = forged
    with pytest.raises(FedscoreError, match="1048576 bytes"):
        check_score(reply, 0, 3, SHAPE)


def describe_message(agents_dirs, i, index=None, counts=None, config=None):
    folder = agents_dirs[i]
    text = (folder / "config.yaml").read_text() if config is None else config
    counts = json.loads((folder / "class_counts.json").read_text())["class_counts"] \
        if counts is None else counts
    return message({"agent": ConfigRecord({
        "agent": i if index is None else index, "name": folder.name, "config": text,
        "class-counts": json.dumps(counts), "signature": "{}", "diffusers": False})},
        "query.describe")


def test_the_clientapp_answers_with_its_own_agents_scores_only(agents):
    """Node 1 (agent-dir = agent 1's folder) describes agent 1 and answers query.score with
    agent 1's row of the stacked in-process agents; its reply passes the server's checks."""
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1,
                                                         "agent-dir": str(agents[1])},
                      state=RecordDict(), run_config={})
    described = describe_reply(fi_client_app.describe(message({}, "query.describe"), context),
                               node=1, k=2)
    assert (described.index, described.name) == (1, "agent-01")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(SHAPE, generator=g), torch.full((SHAPE[0],), 0.7)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    query = message({"inputs": ArrayRecord({"x": Array(x.numpy()), "t": Array(t.numpy()),
                                            "y": Array(y.numpy())}),
                     "call": ConfigRecord({"call": 4})}, "query.score")
    s, _ = check_score(fi_client_app.score(query, context), 1, 4, SHAPE)
    torch.testing.assert_close(s, load_agents(agents)(x, t, y)[1], rtol=1e-5, atol=1e-6)
    # a server that sends float64 gets an error reply, not a silent cast
    query.content["inputs"]["x"] = Array(x.double().numpy())
    with pytest.raises(FedscoreError, match="float64"):
        fi_client_app.score(query, context)


def test_described_agents_give_the_in_process_weights(agents):
    """What the server learns (class counts, never weights) weighs the agents as
    load_agents' counts do."""
    described = [describe_reply(describe_message(agents, i), node=10 + i, k=2)
                 for i in (1, 0)]
    bound = bind(described, 2)
    assert [a.index for a in bound] == [0, 1] and [a.node for a in bound] == [10, 11]
    remote = RemoteAgents(None, bound, timeout=1, poll=0.1, log=None)
    labels = torch.tensor([0, 1, 2, 3, 3])
    stacked = load_agents(agents)
    assert torch.equal(remote.counts, stacked.counts)
    torch.testing.assert_close(remote.weights_for(labels), stacked.weights_for(labels))
    assert remote.with_labels(labels).labels is labels and remote.n_agents == 2


@pytest.mark.parametrize("kw, why", [
    ({"index": 2}, "has 2 agents"),
    ({"counts": [1, -1]}, "non-negative"),
    ({"counts": [0, 0]}, "positive sum"),
    ({"config": "seed: [unclosed"}, "not valid YAML"),
])
def test_a_wrong_description_is_one_clear_error_naming_the_node(agents, kw, why):
    with pytest.raises(FedscoreError, match=f"SuperNode 7 .*{why}"):
        describe_reply(describe_message(agents, 0, **kw), node=7, k=2)


def test_every_agent_must_be_held_by_exactly_one_node(agents):
    cfg = load_config(agents[0] / "config.yaml")
    one = [Agent(0, 5, "a", cfg, [1]), Agent(0, 6, "b", cfg, [1])]
    with pytest.raises(FedscoreError, match=r"agent 0 is held by 2 SuperNodes \[5, 6\]"):
        bind(one, 2)
    with pytest.raises(FedscoreError, match="agent 1 is held by 0"):
        bind(one[:1], 2)


def test_the_launcher_reports_the_servers_reason(tmp_path):
    (tmp_path / STATUS).write_text(json.dumps(
        {"token": "t1", "state": "failed", "reason": "agent 1 (agent-01, node 4) failed"}))
    with pytest.raises(FedscoreError, match=r"agent 1 \(agent-01"):
        fi_result(tmp_path, "t1", "", tmp_path / "run.log")
    # a status left by another launch proves nothing: the server's own log line decides
    with pytest.raises(FedscoreError, match="did not sample: boom"):
        fi_result(tmp_path, "t2", "x\n[fedscore] failed: boom\n", tmp_path / "run.log")


def test_bad_deployments_and_folders_are_clear_errors(agents, tmp_path):
    with pytest.raises(FedscoreError, match="unknown deployment 'ray'"):
        sample_agents_on(agents, tmp_path, deployment="ray")
    with pytest.raises(FedscoreError, match="unknown aggregator"):
        sample_agents_on(agents, tmp_path, deployment="loopback", aggregator="median")
    with pytest.raises(FedscoreError, match="not a run folder"):
        sample_agents_on([tmp_path / "nowhere"], tmp_path, deployment="loopback")


# ------------------------------------------------------------ route: the silo's reply


def route_query(labels, rows, steps=3, seed=4, call=0):
    times = torch.tensor([5.0, 1.0, 0.1, 1e-3], dtype=torch.float64)[: steps + 1]
    return message({"inputs": ArrayRecord({"y": Array(labels.numpy()),
                                           "rows": Array(rows.numpy()),
                                           "times": Array(times.numpy())}),
                    "call": ConfigRecord({"call": call, "seed": seed,
                                          "method": "exp-integrator"})}, "query.route"), times


def test_a_silo_samples_its_own_rows_as_the_in_process_route_does(agents):
    """Node 1's answer to query.route is exactly its rows of agent 1 sampling the whole
    batch alone from the seed's noise (what the in-process route gives those rows), and
    passes the server's checks; the other rows never leave it."""
    from fedscore.experiments.agents import SAMPLER
    from fedscore.inference import draw

    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1,
                                                         "agent-dir": str(agents[1])},
                      state=RecordDict(), run_config={})
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    rows = torch.tensor([1, 4, 5])
    query, times = route_query(labels, rows)
    x, _ = check_samples(fi_client_app.route(query, context), 1, 0, rows, (3, 2))
    stacked = load_agents(agents)
    alone = draw(lambda z, t: stacked(z, t, labels)[1], len(labels), (2,), times, SAMPLER, 4)
    torch.testing.assert_close(x, alone[rows], rtol=1e-5, atol=1e-5)
    bad, _ = route_query(labels, torch.tensor([3, 3]))
    with pytest.raises(FedscoreError, match="agent 1 .*rows outside 0..7 or repeated"):
        fi_client_app.route(bad, context)


def samples_reply(rows=(1, 4), values=None, agent=0, call=0, rows_dtype=np.int64, extra=None):
    values = np.zeros((len(rows), 2), np.float32) if values is None else values
    arrays = {"x": Array(values), "rows": Array(np.array(rows, rows_dtype))} | (extra or {})
    return message({"samples": ArrayRecord(arrays),
                    "call": ConfigRecord({"agent": agent, "call": call}),
                    "metrics": MetricRecord({"score-seconds": 0.1})}, "query.route")


@pytest.mark.parametrize("reply, why", [
    (samples_reply(rows=(4, 1)), "other rows"),
    (samples_reply(rows=(1, 5)), "other rows"),
    (samples_reply(rows=(1, 4), rows_dtype=np.int32), "rows int32"),
    (samples_reply(rows=(1, 4, 5), values=np.zeros((2, 2), np.float32)), r"rows .*\(2,\)"),
    (samples_reply(values=np.zeros((3, 2), np.float32)), r"expected float32 \(2, 2\)"),
    (samples_reply(values=np.full((2, 2), np.nan, np.float32)), "not all finite"),
    (samples_reply(values=np.zeros((2, 2), np.float64)), "float64"),
    (samples_reply(agent=1), "marked agent 1"),
    (samples_reply(extra={"y": Array(np.zeros(2, np.int64))}), "expected rows, x"),
])
def test_a_route_reply_that_does_not_fit_what_was_sent_is_refused(reply, why):
    with pytest.raises(FedscoreError, match=why):
        check_samples(reply, 0, 0, torch.tensor([1, 4]), (2, 2))


def test_a_well_formed_route_reply_is_accepted_as_sent():
    values = np.arange(4, dtype=np.float32).reshape(2, 2)
    x, metrics = check_samples(samples_reply(values=values), 0, 0, torch.tensor([1, 4]), (2, 2))
    assert torch.equal(x, torch.from_numpy(values)) and metrics == {"score-seconds": 0.1}
