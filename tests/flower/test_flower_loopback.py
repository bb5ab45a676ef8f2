"""Flower on loopback with real processes: a SuperLink and SuperNodes on 127.0.0.1, `flwr
run` against them. Every process a test starts is stopped by its PID (the `LocalFlowerCluster`
context manager), even when the test fails."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from fedscore.config import load_config
from fedscore.flower.launch import LocalFlowerCluster
from fedscore.flower.run import run_flower, server_settings
from fedscore.runs.checkpoint import load_checkpoint
from fedscore.runs.federated import train_federated
from run_records import records, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def fed_config(tmp_path, name, policy, workers=2, rounds=2, top=None, **extra):
    fields = {**(top or {}),
        "name": name, "out_dir": str(tmp_path / "inprocess"), "seed": 3,
        "data": {"name": "gmm:ring8"},
        "model": {"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        "diffusion": {"steps": 20},
        "train": {"eval_batch": 64},
        "federation": {"workers": workers, "rounds": rounds, "local_steps": 2,
                       "batch_size": 16, "lr": 1e-2, "policy": policy, "level": "M",
                       "strategy": "sequential", **extra},
    }
    return load_config(**fields)




def assert_same_run(out, cfg):
    """The Flower run folder `out` holds what the in-process engine computes for cfg."""
    assert (out / "flower.json").is_file()
    # one thread, as every SuperNode runs: a matmul summed in another order rounds
    # differently, and Adam's m / sqrt(v) magnifies that for coordinates with tiny gradients
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train_federated(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(reference.params)
    for k, v in reference.params.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    logged, want = records(out), records(reference.folder.path)
    assert [r["round"] for r in logged] == list(range(1, cfg.federation.rounds + 1))
    assert all(r["replies"] == cfg.federation.workers and not r["degraded"] for r in logged)
    assert [r["gamma_star"] for r in logged] == [r["gamma_star"] for r in want]
    for a, b in zip(logged, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # sparse payloads: kept values (+ mask bits for top-k) < the dense model
    assert all(r["bytes_up_total"] < r["bytes_dense_fedavg_up_total"] for r in logged)


def test_two_supernodes_match_the_in_process_engine(tmp_path):
    """2 rounds on a SuperLink + 2 SuperNodes == the in-process engine (same seeds,
    partitions, masks), for top-k and random masks. The top-k run is stopped after round 1
    and resumed from the server's checkpoint."""
    with LocalFlowerCluster(tmp_path / "home", nodes=2) as fed:
        cfg = fed_config(tmp_path, "eq-topk", "topk")
        out = tmp_path / "flower-topk"
        first = fed_config(tmp_path, "eq-topk", "topk", rounds=1)
        fed.run_app(server_settings(first, out, round_timeout=300), timeout=600)
        assert [r["round"] for r in records(out)] == [1]
        fed.run_app(server_settings(cfg, out, resume=True, round_timeout=300), timeout=600)
        assert_same_run(out, cfg)

        cfg = fed_config(tmp_path, "eq-random", "random")
        rand = tmp_path / "flower-random"
        fed.run_app(server_settings(cfg, rand, round_timeout=300), timeout=600)
        assert_same_run(rand, cfg)
    # same kept counts; random masks travel as their seed, top-k masks as packed bits (a
    # worker that keeps everything sends no mask under either policy)
    topk_up, random_up = records(out)[0]["bytes_up"], records(rand)[0]["bytes_up"]
    assert all(r <= t for r, t in zip(random_up, topk_up))
    assert sum(random_up) < sum(topk_up)


def test_flower_simulation_runtime_matches_the_in_process_engine(tmp_path):
    """Flower's simulation runtime (`flwr run` on a --simulation SuperLink), 2 rounds, with
    Adam's moments kept across rounds (in each node's context state)."""
    pytest.importorskip("ray")
    cfg = fed_config(tmp_path, "sim", "topk", workers=3, adam_state="keep")
    out = tmp_path / "flower-sim"
    with LocalFlowerCluster(tmp_path / "home", simulation=True, sim_nodes=3) as fed:
        fed.run_app(server_settings(cfg, out, round_timeout=300), timeout=600)
    assert_same_run(out, cfg)


def test_simulation_with_explicit_client_resources(tmp_path):
    """`fedscore flower run --deployment simulation --client-cpus 1 --client-gpus 0`: Flower's
    backend client resources set explicitly (num-gpus 0: the virtual nodes see no GPU, so
    device "auto" trains them on the CPU, as the in-process reference does)."""
    pytest.importorskip("ray")
    cfg = fed_config(tmp_path, "sim-res", "random", workers=2, rounds=1)
    out = run_flower(cfg, tmp_path / "flower-sim-res", deployment="simulation", client_cpus=1,
                     client_gpus=0.0, round_timeout=300, stream=False)
    assert_same_run(out, cfg)
    assert records(out)[0]["worker_devices"] == ["cpu/fp32"] * 2
    run_log = (out / "flower-home" / "logs" / "run.log").read_text()
    assert "ActorPool is empty" not in run_log


def test_a_supernode_on_a_missing_device_is_dropped_with_a_clear_error(tmp_path):
    """SuperNode 1's node config names a device its machine lacks: its log says so in one
    line, the server drops its reply (the reason names the device), the run goes on."""
    cfg = fed_config(tmp_path, "bad-device", "topk", rounds=1)
    out = tmp_path / "flower-bad-device"
    with LocalFlowerCluster(tmp_path / "home", nodes=2, devices={0: "cpu", 1: "cuda:7"}) as fed:
        fed.run_app(server_settings(cfg, out, round_timeout=300), timeout=600)
        node_log = fed.log("supernode1").read_text()
    assert "partition-id=1: cannot train on the node config's device 'cuda:7'" in node_log
    (r,) = records(out)
    assert r["replies"] == 1 and r["degraded"] and r["workers"] == [0]
    assert r["missing_workers"] == [1]
    (reason,) = r["failed"].values()
    assert "cuda:7" in reason and "not available here" in reason
    assert r["worker_devices"] == ["cpu/fp32"]


def test_a_killed_supernode_is_dropped_and_the_run_continues(tmp_path):
    """One of 3 SuperNodes is killed by its PID during round 2: round 2 completes with the 2
    replies that arrive, round 3 runs, the log says what happened, the checkpoint loads."""
    cfg = fed_config(tmp_path, "fault", "topk", workers=3, rounds=3)
    out = tmp_path / "flower-fault"
    with LocalFlowerCluster(tmp_path / "home", nodes=3) as fed:
        settings = server_settings(cfg, out, round_timeout=150)
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("run", fed.run_app(settings, timeout=800)))
        thread.start()
        try:
            wait_for(lambda: (out / "metrics.jsonl").is_file()
                     and len(records(out)) >= 1, 400, "round 1")
            fed.kill_node(2)
            assert fed.processes["supernode2"].poll() is not None
        finally:
            thread.join(timeout=850)
        assert (out / "flower.json").is_file(), result.get("run")
    logged = records(out)
    assert [r["round"] for r in logged] == [1, 2, 3]
    assert logged[0]["replies"] == 3 and not logged[0]["degraded"]
    assert logged[1]["replies"] == 2 and logged[1]["degraded"]
    assert sorted(logged[1]["workers"]) == [0, 1]
    assert logged[1]["failed"], "the log must name the node that failed"
    assert logged[2]["replies"] == 2 and logged[2]["degraded"]
    assert logged[1]["missing_workers"] == logged[2]["missing_workers"] == [2]
    assert all(r["loss"] == r["loss"] for r in logged)  # finite losses, not NaN
    tensors, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["round"] == 3
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_tls_and_supernode_authentication(tmp_path):
    """With TLS and SuperNode auth a run succeeds; an unregistered node is refused; a
    plaintext client cannot connect."""
    cfg = fed_config(tmp_path, "secure", "topk", rounds=1)
    out = tmp_path / "flower-secure"
    with LocalFlowerCluster(tmp_path / "home", nodes=2, tls=True, auth=True) as fed:
        done = fed.run_app(server_settings(cfg, out, round_timeout=300), timeout=600)
        assert (out / "flower.json").is_file(), done.stdout[-3000:]
        assert records(out)[0]["replies"] == 2

        rogue = fed.start_node(2, register=False)  # a key nobody registered
        assert rogue.wait(timeout=120) != 0

        plain = fed.node_args(3)
        plain[plain.index("--root-certificates"):plain.index("--root-certificates") + 2] = [
            "--insecure"]
        plain += ["--max-retries", "1", "--max-wait-time", "10"]
        proc = fed._spawn("plaintext", plain)
        assert proc.wait(timeout=120) != 0
