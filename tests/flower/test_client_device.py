"""Where a SuperNode trains (node config `device`, else the run config's), what it sends back
(CPU float32 whatever the device), and the launcher's per-node devices and simulation client
resources; no Flower processes are started here."""

import numpy as np
import pytest
import torch
from clientapp_harness import client_round

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.federated.setup import prepare, worker_round
from fedscore.flower import client_app, payload
from fedscore.flower.launch import LocalFlowerCluster
from fedscore.flower.records import from_flat_record
from fedscore.flower.run import run_flower

MISSING = "cuda:7"  # no machine this suite runs on has eight GPUs


def cfg(**top):
    return load_config(**{
        "data": {"name": "gmm:ring8"}, "model": {"options": {"hidden": 16, "depth": 1}},
        "diffusion": {"steps": 10},
        "federation": {"workers": 2, "rounds": 1, "local_steps": 2, "batch_size": 8,
                       "policy": "topk", "level": "S"}, **top,
    })


def test_node_config_device_wins_over_the_run_config():
    c = cfg(device="cpu", precision="bf16")
    rt = client_app.node_runtime(c, {"partition-id": 0, "device": "cpu"})
    assert (rt.device.type, rt.precision) == ("cpu", "bf16")  # precision: the run config's
    assert client_app.node_runtime(c, {"partition-id": 0}).device.type == "cpu"
    auto = client_app.node_runtime(cfg(), {"partition-id": 0})  # "auto": CUDA if present
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_an_unavailable_device_is_one_clear_error_naming_the_node():
    with pytest.raises(FedscoreError, match=r"partition-id=1: cannot train on the node "
                       r"config's device 'cuda:7': .*not available here; this machine has: cpu"):
        client_app.node_runtime(cfg(), {"partition-id": 1, "device": MISSING})
    with pytest.raises(FedscoreError, match="run config's device 'cuda:7'"):
        client_app.node_runtime(cfg(device=MISSING), {"partition-id": 0})


def test_the_clientapp_refuses_a_missing_device_before_training():
    c = cfg()
    params = prepare(c).init_params
    with pytest.raises(FedscoreError, match="cuda:7"):
        client_round(c, params, 0, {"partition-id": 1, "num-partitions": 2, "device": MISSING})


def test_the_reply_is_cpu_float32_and_is_the_workers_round():
    c = cfg(device="cpu")
    f = prepare(c)
    reply = client_round(c, f.init_params, 0, {"partition-id": 1, "num-partitions": 2})
    values = reply.content["payload"]["values"].numpy()
    assert values.dtype == np.float32
    assert dict(reply.content["runtime"]) == {"device": "cpu", "precision": "fp32"}
    theta, mask, _, _ = worker_round(f, f.init_params, 0, 1)
    want, _ = payload.encode(theta, mask)
    np.testing.assert_array_equal(values, want["values"])


def test_from_flat_record_places_tensors_like_the_model():
    like = {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)}
    from fedscore.flower.records import flat_record
    got = from_flat_record(flat_record({"a": torch.ones(2, 3), "b": torch.arange(4.0)}), like)
    assert got["a"].dtype == torch.float64 and got["a"].shape == (2, 3)
    assert torch.equal(got["b"], torch.arange(4.0))


def test_cluster_per_node_devices_and_client_resources(tmp_path):
    fed = LocalFlowerCluster(tmp_path, nodes=2, devices={1: "cuda:1"})
    fed.port = 9
    assert "device=\"cuda:1\"" in fed.node_args(1)[-2]
    assert "device" not in fed.node_args(0)[-2]

    sim = LocalFlowerCluster(tmp_path, simulation=True, sim_nodes=4, client_cpus=1,
                             client_gpus=0.25)
    assert sim.simulation_config() == {"num-supernodes": 4, "client-resources-num-cpus": 1,
                                       "client-resources-num-gpus": 0.25}
    assert LocalFlowerCluster(tmp_path, simulation=True).simulation_config() == {
        "num-supernodes": 2}  # Flower's defaults otherwise
    zero = LocalFlowerCluster(tmp_path, simulation=True, client_gpus=0)
    assert zero.env()["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"  # GPUs hidden from nodes
    assert sim.env()["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"


@pytest.mark.parametrize("kwargs, match", [
    ({"simulation": True, "devices": {0: "cpu"}}, "per-node devices"),
    ({"client_gpus": 0.5}, "simulation runtime"),
    ({"simulation": True, "client_cpus": 0}, "whole number >= 1"),
    ({"simulation": True, "client_cpus": 1.5}, "whole number >= 1"),
    ({"simulation": True, "client_gpus": -1}, "fraction of one GPU"),
    ({"simulation": True, "client_gpus": 1.5}, "fraction of one GPU"),
])
def test_cluster_refuses_settings_that_do_not_fit(tmp_path, kwargs, match):
    with pytest.raises(FedscoreError, match=match):
        LocalFlowerCluster(tmp_path, **kwargs)


def test_run_flower_refuses_settings_that_do_not_fit(tmp_path):
    c = cfg()
    with pytest.raises(FedscoreError, match="--deployment loopback"):
        run_flower(c, tmp_path, deployment="simulation", node_devices={0: "cpu"})
    with pytest.raises(FedscoreError, match="--deployment simulation"):
        run_flower(c, tmp_path, client_gpus=0.5)
    with pytest.raises(FedscoreError, match=r"node\(s\) \[2\]"):
        run_flower(c, tmp_path, node_devices={2: "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(FedscoreError, match="no CUDA device"):
            run_flower(c, tmp_path, deployment="simulation", client_gpus=0.25)
