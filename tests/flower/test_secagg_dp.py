"""Client-level DP with secure aggregation (issue 19): each worker clips its own update
(under SecAgg+ nobody else sees it) and, with distributed noise, adds its N(0, (zC)^2 / N)
share before the mod masks it; with central noise the server noises the unmasked sum. With
the noise key pinned both equal the in-process engine's DP run within SecAgg+'s
quantisation bound. Flower's real workflow and mod, in this process (secagg_harness)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fedscore.config import dump_config, load_config
from fedscore.federated.loop import run_rounds
from fedscore.federated.setup import model_setup
from fedscore.flower import secure
from fedscore.flower.secure_transport import SecureFlowerTransport
from fedscore.privacy import plan_for
from fedscore.runs.federated import train_federated

sys.path.insert(0, str(Path(__file__).parent))
from secagg_harness import LocalGrid, server_identity  # noqa: E402


def config(tmp_path, noise, secure_aggregation=True):
    return load_config(
        name=f"secagg-dp-{noise}", out_dir=str(tmp_path / "runs"), seed=3,
        data={"name": "gmm:ring8"}, model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"steps": 20}, train={"eval_batch": 64},
        federation={"workers": 3, "rounds": 2, "local_steps": 2, "batch_size": 16,
                    "lr": 1e-2, "policy": "random", "level": "M", "optimizer": "sgd",
                    "strategy": "sequential", "secure_aggregation": secure_aggregation},
        privacy={"mode": "client", "clip": 0.05, "noise_multiplier": 0.3, "noise": noise,
                 "noise_seed": 11})


@pytest.mark.parametrize("noise", ["distributed", "central"])
def test_secure_dp_fedavg_equals_the_in_process_dp_run(tmp_path, noise):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every ClientApp runs; the reference must round alike
    try:
        cfg = config(tmp_path, noise)
        setup = model_setup(cfg)
        transport = SecureFlowerTransport(LocalGrid(3), setup, dump_config(cfg), start_wait=1.0,
                                          node_wait=1.0, poll=0.0, round_timeout=60.0)
        logged = []
        with server_identity():
            out = run_rounds(setup.init_params, transport, rounds=2, privacy=plan_for(cfg),
                             hooks=[lambda e: logged.append(e.record)])
        plain = cfg.model_copy(update={"federation": cfg.federation.model_copy(
            update={"secure_aggregation": False})})
        reference = train_federated(plain, progress=False)
    finally:
        torch.set_num_threads(threads)
    bound = secure.quantization_bound(cfg.federation.secagg, 3)
    moved = 0.0
    for k, v in reference.params.items():
        torch.testing.assert_close(out.params[k], v, rtol=0, atol=2 * 2 * bound)
        moved = max(moved, float((v - setup.init_params[k]).abs().max()))
    assert moved > 100 * bound  # the noise and the updates are far above the tolerance
    lines = (reference.folder.path / "metrics.jsonl").read_text().splitlines()
    assert [r["epsilon"] for r in logged] == pytest.approx(
        [json.loads(line)["epsilon"] for line in lines], rel=1e-9)
    assert logged[1]["epsilon"] > logged[0]["epsilon"] > 0
