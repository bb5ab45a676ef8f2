"""Differential privacy on real Flower processes (issue 19): DP-FedAvg with the server's
central noise and DP-SGD on the workers give the in-process engine's model when the noise
key is pinned (`privacy.noise_seed`: the same draws on both sides), and the same epsilon in
every round's record. One simulation run per mode; every process stopped by its PID."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.flower import secure
from fedscore.flower.run import run_flower
from fedscore.runs.federated import train_federated
from run_records import records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def dp_config(tmp_path, name, privacy, **fed):
    return load_config(
        name=name, out_dir=str(tmp_path / "inprocess"), seed=3,
        data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"steps": 20}, train={"eval_batch": 64},
        federation={"workers": 3, "rounds": 2, "local_steps": 2, "batch_size": 16,
                    "lr": 1e-2, "optimizer": "sgd", "policy": "random", "level": "M",
                    "strategy": "sequential", **fed},
        privacy={"delta": 1e-5, "noise_seed": 7, **privacy})



@pytest.mark.parametrize("privacy", [
    {"mode": "client", "clip": 0.05, "noise_multiplier": 0.5, "noise": "central"},
    {"mode": "sample", "clip": 1.0, "noise_multiplier": 1.0},
], ids=["client-central", "sample"])
def test_dp_on_the_simulation_runtime_is_the_in_process_dp(tmp_path, privacy):
    pytest.importorskip("ray")
    cfg = dp_config(tmp_path, f"dp-{privacy['mode']}", privacy)
    out = run_flower(cfg, tmp_path / "flower", deployment="simulation", client_cpus=1,
                     client_gpus=0.0, round_timeout=300, stream=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every SuperNode runs
    try:
        reference = train_federated(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(out / "model.safetensors"))
    for k, v in reference.params.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    flower, inproc = records(out), records(reference.folder.path)
    for a, b in zip(flower, inproc):
        assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)
    assert flower[1]["epsilon"] > flower[0]["epsilon"] > 0
    if privacy["mode"] == "sample":  # the workers' own accounting, reported
        assert len(flower[0]["worker_epsilon_reported"]) == 3
    else:  # the server clipped every accepted update
        assert 0 <= flower[0]["clipped_fraction"] <= 1


def test_distributed_noise_without_secure_aggregation_is_refused(tmp_path):
    cfg = dp_config(tmp_path, "dp-dist", {"mode": "client", "clip": 1.0,
                                          "noise_multiplier": 1.0, "noise": "distributed"})
    with pytest.raises(FedscoreError, match="secure_aggregation"):
        secure.check_privacy(cfg)
    with pytest.raises(FedscoreError, match="secure_aggregation"):
        run_flower(cfg, tmp_path / "flower", deployment="simulation", stream=False)
    assert not (tmp_path / "flower").exists()
