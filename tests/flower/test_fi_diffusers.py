"""Federated inference on Flower with diffusers folders as agents (issue 18, item 6 on
Flower): each SuperNode holds a pipeline or unet folder; the server learns its synthesised
config, class counts and signature (shapes, never the weights' values), refuses agents of
different architectures as `load_agents` does, and samples what the in-process deployment
samples for the same seed."""

from __future__ import annotations

import json

import pytest
import torch
from clientapp_harness import message
from flwr.app import ConfigRecord, Context, RecordDict

from diffusers_folders import saved_unet
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import load_agents
from fedscore.flower import fi_client_app
from fedscore.flower.fi_run import STATUS, sample_agents_on
from fedscore.flower.fi_server_app import bind, check_described, describe_reply
from fedscore.runs.evaluate import load_samples

pytest.importorskip("diffusers")


def node(folder, pid: int) -> Context:
    return Context(run_id=1, node_id=10 + pid, state=RecordDict(), run_config={},
                   node_config={"partition-id": pid, "agent-dir": str(folder)})


def described(folders):
    """What the server learns from each folder's SuperNode (its ClientApp's describe)."""
    return bind([describe_reply(fi_client_app.describe(message({}, "query.describe"),
                                                       node(f, i)), node=10 + i, k=len(folders))
                 for i, f in enumerate(folders)], len(folders))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two class-conditional 8x8 pipelines (10 labels) with their class counts, and a unet
    folder of another width."""
    root = tmp_path_factory.mktemp("diffusers-agents")
    a, b, wide = root / "hospital-a", root / "hospital-b", root / "wide"
    saved_unet(a, pipeline=True, seed=0, num_class_embeds=11, counts=[5] * 5 + [0] * 5)
    saved_unet(b, pipeline=True, seed=1, num_class_embeds=11, counts=[0] * 5 + [5] * 5)
    saved_unet(wide, seed=2, num_class_embeds=11, block_out_channels=(8, 16))
    return a, b, wide


def test_a_supernode_describes_its_diffusers_folder_and_scores_with_it(folders):
    """describe: the synthesised config, the folder's counts, diffusers=true and a signature
    of shapes; score: the folder's own row of the in-process stacked agents."""
    a, b, _ = folders
    agents = described([a, b])
    assert [x.diffusers for x in agents] == [True, True]
    assert agents[0].config.model.kind == "diffusers-unet"
    assert agents[0].counts == [5] * 5 + [0] * 5 and agents[1].counts == [0] * 5 + [5] * 5
    assert agents[0].signature == agents[1].signature and agents[0].signature["parameters"]
    check_described(agents)  # one architecture: accepted
    from flwr.app import Array, ArrayRecord

    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.02, 0.5, 3.0]), \
        torch.tensor([0, 4, 9])
    query = message({"inputs": ArrayRecord({"x": Array(x.numpy()), "t": Array(t.numpy()),
                                            "y": Array(y.numpy())}),
                     "call": ConfigRecord({"call": 1})}, "query.score")
    reply = fi_client_app.score(query, node(b, 1))
    got = torch.from_numpy(reply.content["scores"]["score"].numpy())
    torch.testing.assert_close(got, load_agents([a, b])(x, t, y)[1], rtol=1e-4, atol=1e-5)


def test_the_server_refuses_agents_of_another_architecture_naming_both(folders):
    a, _, wide = folders
    with pytest.raises(FedscoreError, match=r"agent 1 \(wide\) differs from agent 0 "
                                            r"\(hospital-a\) in its parameters"):
        check_described(described([a, wide]))
    with pytest.raises(FedscoreError, match="differs from"):  # as load_agents says in-process
        load_agents([a, wide])


def test_a_description_whose_signature_is_not_an_object_is_refused(folders):
    reply = fi_client_app.describe(message({}, "query.describe"), node(folders[0], 0))
    reply.content["agent"]["signature"] = json.dumps([1, 2])
    with pytest.raises(FedscoreError, match="SuperNode 3 described its agent wrongly"):
        describe_reply(reply, node=3, k=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_route_over_two_diffusers_silos_on_the_simulation_runtime_is_the_in_process_route(
        folders, tmp_path):
    """Each virtual SuperNode samples its rows from its own pipeline folder (one message per
    silo); the assembled samples are the in-process route's for the same seed."""
    pytest.importorskip("ray")
    a, b, _ = folders
    kw = {"aggregator": "route", "per_label": 1, "steps": 3, "seed": 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every SuperNode runs
    try:
        want = sample_agents_on([a, b], tmp_path / "ref", **kw)
    finally:
        torch.set_num_threads(threads)
    got = sample_agents_on([a, b], tmp_path / "sim", deployment="simulation",
                           start_wait=120, step_timeout=300, **kw)
    x, labels = load_samples(got["samples"], (1, 8, 8))
    x_ref, labels_ref = load_samples(want["samples"], (1, 8, 8))
    assert torch.equal(labels, labels_ref) and torch.isfinite(x).all()
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)
    (call,) = json.loads((tmp_path / "sim" / STATUS).read_text())["calls"]
    assert call["kind"] == "route" and call["agents"] == [0, 1]
