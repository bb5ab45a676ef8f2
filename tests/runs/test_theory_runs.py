"""Theory on real runs: the estimators ride along a federated run (opt-in) and the bound
report reads them back; across the pruning levels Gamma* falls and w^2 rises."""

import pytest

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.runs.federated import train_federated
from fedscore.theory import constants_from_metrics, run_bound


def cfg_for(tmp_path, level, estimate=True):
    return load_config(
        None, name=f"level-{level}", out_dir=str(tmp_path), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"grid": "exponential", "steps": 20, "T": 5.0, "delta": 1e-3},
        train={"eval_batch": 32},
        federation={"workers": 10, "rounds": 3, "local_steps": 2, "batch_size": 16,
                    "lr": 1e-3, "optimizer": "sgd", "policy": "random", "level": level,
                    "partition": {"scheme": "shards", "classes_per_worker": 2}},
        theory={"estimate": estimate, "every": 1, "full_batch": 128},
    )


@pytest.mark.slow
def test_gamma_star_falls_and_w_rises_from_level_F_to_S(tmp_path):
    constants = {}
    for level in "FLMS":
        run = train_federated(cfg_for(tmp_path, level), progress=False)
        constants[level] = constants_from_metrics(run.folder.metrics())
    gammas = [constants[lv]["gamma_star"] for lv in "FLMS"]
    ws = [constants[lv]["w"] for lv in "FLMS"]
    assert gammas[0] == 10 and all(a >= b for a, b in zip(gammas, gammas[1:])), gammas
    assert ws[0] == 0 and all(a <= b + 1e-12 for a, b in zip(ws, ws[1:])), ws
    assert gammas[-1] < gammas[0] and ws[-1] > 0
    report = run_bound(tmp_path / "level-S", None, None).read_text()
    assert "Observed (1/Q) sum_q ||grad F(theta_q)||^2" in report
    assert "BELOW the bound" in report or "VIOLATED" in report


def test_a_run_without_estimates_gets_a_clear_message(tmp_path):
    train_federated(cfg_for(tmp_path, "F", estimate=False), progress=False)
    with pytest.raises(FedscoreError, match="theory"):
        run_bound(tmp_path / "level-F", None, None)
