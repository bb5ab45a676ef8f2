"""A hostile SuperNode through the real ServerApp under Flower's simulation runtime (issue
16): partition 0's ClientApp (tests/reliability/hostile_clientapp.py) corrupts its reply
with another case every round; the run must finish, log each of those replies as dropped
with its reason, and end with the model of the same run in which worker 0 simply never
answered (the honest workers' real ClientApp replies, computed here in-process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedscore.config import dump_config, load_config
from fedscore.federated.loop import run_rounds
from fedscore.federated.setup import model_setup
from fedscore.flower import launch
from fedscore.flower.launch import LocalFlowerCluster
from fedscore.flower.run import server_settings
from fedscore.flower.transport import FlowerTransport
from run_records import records

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "flower"))
from clientapp_harness import client_round  # noqa: E402
from hostile_clientapp import CASES  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
WORKERS = 3


def config(out_dir: Path):
    # worker 0 (the hostile one) is pruned, so a claimed full mask is a lie; the norm bound
    # is ~10x an honest update of this run
    return load_config(
        name="hostile", out_dir=str(out_dir), seed=5, data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}}, diffusion={"steps": 20},
        federation={"workers": WORKERS, "rounds": len(CASES), "local_steps": 2,
                    "batch_size": 16, "lr": 1e-2, "policy": "topk",
                    "keep_ratios": [0.6, 0.8, 1.0], "strategy": "sequential",
                    "max_update_norm": 20.0})


class WithoutWorker0:
    """The Flower transport's round step fed with the honest workers' replies only: the
    run as it would be if worker 0 had never answered."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.transport = FlowerTransport(None, model_setup(cfg), dump_config(cfg))

    def run_round(self, q, params):
        replies = {n + 1: client_round(self.cfg, params, q, {"partition-id": n,
                                                             "num-partitions": WORKERS})
                   for n in range(1, WORKERS)}
        return self.transport.collect(q, params, [1, 2, 3], replies, {})


def test_a_hostile_supernode_is_dropped_every_round_and_the_model_is_unharmed(
        tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # the app's clientapp is the hostile module, importable by every Flower process
    monkeypatch.setattr(launch, "APP_PYPROJECT", launch.APP_PYPROJECT.replace(
        'clientapp = "fedscore.flower.client_app:app"', 'clientapp = "hostile_clientapp:app"'))
    monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    cfg = config(tmp_path / "inprocess")
    out = tmp_path / "flower-hostile"
    with LocalFlowerCluster(tmp_path / "home", simulation=True, sim_nodes=WORKERS) as fed:
        done = fed.run_app(server_settings(cfg, out, round_timeout=300), timeout=550)
    assert (out / "flower.json").is_file(), done.stdout[-3000:]

    logged = records(out)
    assert [r["round"] for r in logged] == list(range(1, len(CASES) + 1))
    for r, (corrupt, words) in zip(logged, CASES):
        assert r["degraded"] and r["workers"] == [1, 2] and r["missing_workers"] == [0], r
        (reason,) = r["failed"].values()
        assert words in reason, (corrupt.__name__, reason)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every virtual node runs: the same rounding
    try:
        setup = model_setup(cfg)
        want = run_rounds(setup.init_params, WithoutWorker0(cfg), rounds=len(CASES),
                          uncovered=cfg.federation.uncovered).params
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
