"""`fedscore flower run` with `federation.secure_aggregation: true` on Flower's real
processes: configs/flower-toy.yaml through SecAgg+ on the simulation runtime equals the
plain in-process run within the summed quantisation bounds, and on loopback (a SuperLink
and 3 SuperNodes) a SuperNode killed mid-run is survived (3 workers, SecAgg+ threshold 2).
Every process is stopped by its PID (`LocalFlowerCluster`)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from fedscore.config import load_config
from fedscore.flower import secure
from fedscore.flower.launch import LocalFlowerCluster
from fedscore.flower.run import run_flower, server_settings
from fedscore.runs.checkpoint import load_checkpoint
from fedscore.runs.federated import train_federated
from run_records import records, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def toy(tmp_path, name, rounds=2, secure_aggregation=True):
    """configs/flower-toy.yaml through SecAgg+, on the CPU, with SGD and seeded random
    masks so that the rounds' quantisation errors add up instead of being magnified (see
    test_secagg_rounds); fewer local steps for time."""
    cfg = load_config("configs/flower-toy.yaml")
    fed = cfg.federation.model_copy(update={
        "rounds": rounds, "local_steps": 5, "optimizer": "sgd", "policy": "random",
        "strategy": "sequential", "secure_aggregation": secure_aggregation})
    return cfg.model_copy(update={"name": name, "federation": fed, "device": "cpu",
                                  "out_dir": str(tmp_path / "runs")})



def assert_equals_plain(out, cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every SuperNode trains
    try:
        plain = cfg.model_copy(update={"federation": cfg.federation.model_copy(
            update={"secure_aggregation": False})})
        reference = train_federated(plain, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(out / "model.safetensors"))
    rounds = cfg.federation.rounds
    bound = secure.quantization_bound(cfg.federation.secagg, cfg.federation.workers)
    for k, v in reference.params.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2 * rounds * bound)
    logged = records(out)
    assert [r["round"] for r in logged] == list(range(1, rounds + 1))
    assert all(r["replies"] == cfg.federation.workers and not r["degraded"] for r in logged)
    assert all(r["secure_aggregation"]["threshold"] == 2 for r in logged)
    assert all(r["bytes_up_total"] > r["bytes_dense_fedavg_up_total"] for r in logged)



def test_loopback_secure_run_survives_a_killed_supernode(tmp_path):
    """A loopback federation of 3 SuperNodes, a 2-round secure run: SuperNode 2 is killed by
    its PID after round 1; round 2 is unmasked from the 2 survivors (threshold 2), logged as
    degraded with the failure, and the checkpoint holds a finite model. (Equality with the
    plain run is the simulation test's below and test_secagg_rounds': loopback adds only
    per-message process starts, ~11 s each, four SecAgg+ stages a round.)"""
    with LocalFlowerCluster(tmp_path / "home", nodes=3) as fed:
        cfg = toy(tmp_path, "secure-dropout", rounds=2)
        out = tmp_path / "secure-dropout"
        settings = server_settings(cfg, out, round_timeout=120)
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("run", fed.run_app(settings, timeout=1000)))
        thread.start()
        try:
            wait_for(lambda: (out / "metrics.jsonl").is_file() and len(records(out)) >= 1,
                     600, "round 1")
            fed.kill_node(2)
        finally:
            thread.join(timeout=1050)
        assert (out / "flower.json").is_file(), result.get("run")
    logged = records(out)
    assert [r["round"] for r in logged] == [1, 2]
    assert logged[0]["replies"] == 3 and not logged[0]["degraded"]
    r = logged[1]
    assert r["replies"] == 2 and r["degraded"] and r["workers"] == [0, 1]
    assert r["missing_workers"] == [2]
    assert r["loss"] == r["loss"]  # a finite loss: the round was unmasked
    tensors, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["round"] == 2
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_simulation_secure_run_equals_plain(tmp_path):
    """`fedscore flower run --deployment simulation` of the secure toy config."""
    pytest.importorskip("ray")
    cfg = toy(tmp_path, "secure-sim")
    out = run_flower(cfg, tmp_path / "secure-sim", deployment="simulation", client_cpus=1,
                     client_gpus=0.0, round_timeout=300, stream=False)
    assert_equals_plain(out, cfg)
