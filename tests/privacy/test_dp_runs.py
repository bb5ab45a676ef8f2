"""Private federated runs on the in-process engine: every round's record carries epsilon
(growing), z, C and the clipped fraction; `fedscore report` shows epsilon; a DP run with
z -> 0 and C -> inf is the plain run; each bad privacy setting is one clear error before a
run folder is written."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.privacy import epsilon
from fedscore.runs.federated import train_federated
from run_records import resumed_to


def fed_cfg(tmp_path, name, privacy=None, rounds=3, strategy="vmap", optimizer="adam",
            policy="topk", **extra):
    kw = {"privacy": privacy} if privacy is not None else {}
    return load_config(
        None, name=name, out_dir=str(tmp_path), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"grid": "exponential", "steps": 30, "T": 5.0, "delta": 1e-3},
        train={"eval_batch": 64},
        federation={"workers": 4, "rounds": rounds, "local_steps": 3, "batch_size": 32,
                    "lr": 2e-3, "policy": policy, "level": "M", "strategy": strategy,
                    "optimizer": optimizer,
                    "partition": {"scheme": "shards", "classes_per_worker": 2}},
        **kw, **extra)


def test_a_private_run_records_epsilon_every_round_and_report_shows_it(tmp_path):
    cfg = fed_cfg(tmp_path, "dp", {"mode": "client", "clip": 0.05, "target_epsilon": 8.0})
    result = train_federated(cfg, progress=False)
    records = result.folder.metrics()
    eps = [r["epsilon"] for r in records]
    assert all(b > a for a, b in zip(eps, eps[1:]))  # it only grows
    z = records[0]["noise_multiplier"]
    assert all(r["noise_multiplier"] == z and r["clip"] == 0.05 for r in records)
    for q, rec in enumerate(records, start=1):
        assert rec["epsilon"] == pytest.approx(epsilon(z, 1.0, q, 1e-5))
        assert 0.0 <= rec["clipped_fraction"] <= 1.0 and len(rec["update_norm"]) == 4
    assert 7.9 <= eps[-1] <= 8.0 + 1e-9 and result.epsilon == eps[-1]
    plan = json.loads((result.folder.path / "privacy.json").read_text())
    assert plan["noise_multiplier"] == z and plan["solved_from_target_epsilon"] == 8.0

    plain = train_federated(fed_cfg(tmp_path, "plain"), progress=False)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["report", str(result.folder.path), str(plain.folder.path),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    assert "## Differential privacy" in text
    row = next(line for line in text.splitlines() if line.startswith("| ε"))
    assert f"{eps[-1]:.4g}" in row and "∞" in row  # the plain run: no guarantee


def test_sample_mode_records_each_workers_epsilon(tmp_path):
    cfg = fed_cfg(tmp_path, "dpsgd", {"mode": "sample", "clip": 1.0, "noise_multiplier": 1.0},
                  rounds=2)
    rec = train_federated(cfg, progress=False).folder.metrics()[-1]
    assert len(rec["worker_epsilon"]) == 4 and rec["epsilon"] == max(rec["worker_epsilon"])
    assert 0.0 <= rec["clipped_fraction"] <= 1.0


@pytest.mark.parametrize(("privacy", "strategy"), [
    ({"mode": "client", "clip": 1e6, "noise_multiplier": 1e-13}, "vmap"),
    ({"mode": "client", "clip": 1e6, "noise_multiplier": 1e-13, "noise": "distributed"},
     "sequential"),
    ({"mode": "sample", "clip": 1e4, "noise_multiplier": 1e-13}, "vmap"),
])
def test_a_dp_run_without_clipping_or_noise_is_the_plain_run(tmp_path, privacy, strategy):
    # SGD: Adam divides by sqrt(v), which turns float rounding at a near-zero gradient into
    # a visible step; eq. 7's SGD keeps the comparison about privacy, not about Adam. Random
    # masks: top-k masks of the next round flip at near-ties under the 1e-7 noise (measured:
    # up to 9e-6 apart with top-k, so the 1e-5 bound failed now and then)
    kw = {"strategy": strategy, "optimizer": "sgd", "policy": "random"}
    plain = train_federated(fed_cfg(tmp_path, "plain", **kw), progress=False)
    dp = train_federated(fed_cfg(tmp_path, "dp", privacy, **kw), progress=False)
    for k, v in plain.params.items():
        assert torch.allclose(v, dp.params[k], atol=1e-5), k


@pytest.mark.parametrize(("federation", "privacy", "message"), [
    ("none", {"mode": "client", "clip": 1.0, "noise_multiplier": 1.0}, "federation: none"),
    ({"workers": 2}, {"mode": "client", "clip": 0.0, "noise_multiplier": 1.0}, "clip"),
    ({"workers": 2}, {"mode": "client", "clip": 1.0, "noise_multiplier": 0.0},
     "noise_multiplier"),
    ({"workers": 2}, {"mode": "client", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
     "delta"),
    ({"workers": 2}, {"mode": "client", "clip": 1.0, "noise_multiplier": 1.0, "delta": 0.0},
     "delta"),
    ({"workers": 2}, {"mode": "client", "clip": 1.0}, "exactly one of noise_multiplier"),
])
def test_bad_privacy_settings_are_one_error_each_at_the_edge(federation, privacy, message):
    with pytest.raises(FedscoreError, match=message) as err:
        load_config(None, federation=federation, privacy=privacy)
    assert str(err.value).count("\n") <= 2  # one problem named, not a wall of errors


@pytest.mark.parametrize(("privacy", "extra", "message"), [
    ({"mode": "sample", "clip": 1.0, "noise_multiplier": 1.0, "noise": "distributed"}, {},
     "noise: central"),
    ({"mode": "client", "clip": 1.0, "noise_multiplier": 1.0}, {"theory": {"estimate": True}},
     "theory.estimate"),
])
def test_privacy_with_settings_it_cannot_honour_is_refused_at_the_edge(tmp_path, privacy,
                                                                      extra, message):
    with pytest.raises(FedscoreError, match=message):
        fed_cfg(tmp_path, "bad", privacy, **extra)


@pytest.mark.parametrize(("privacy", "fed", "message"), [
    ({"mode": "client", "clip": 1.0, "target_epsilon": 1e-6}, {}, "cannot be met"),
    ({"mode": "sample", "clip": 1.0, "noise_multiplier": 1.0}, {"batch_size": 4000},
     "fewer than federation.batch_size"),
])
def test_a_plan_that_cannot_run_writes_no_run_folder(tmp_path, privacy, fed, message):
    cfg = fed_cfg(tmp_path, "bad", privacy)
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update=fed)})
    with pytest.raises(FedscoreError, match=message):
        train_federated(cfg, progress=False)
    assert not (tmp_path / "bad").exists()


def dp_sgd_cfg(tmp_path, **extra):
    return load_config(None, name="dp-bf16", out_dir=str(tmp_path / "runs"),
                       data={"name": "gmm:ring8"}, model={"options": {"hidden": 8, "depth": 1}},
                       federation={"workers": 2, "rounds": 1, "local_steps": 1,
                                   "batch_size": 8},
                       privacy={"mode": "sample", "clip": 1.0, "noise_multiplier": 1.0},
                       **extra)


def test_dp_sgd_in_bf16_on_the_cpu_is_one_clear_error_before_any_file(tmp_path):
    """DP-SGD's per-sample gradients are a vmap of grad, which fails under CPU autocast in
    this torch: refused with the fix, like the engine's vmap strategy, nothing written."""
    from fedscore.runtime import resolve

    with pytest.raises(FedscoreError, match="precision fp32"):
        train_federated(dp_sgd_cfg(tmp_path), progress=False, runtime=resolve("cpu", "bf16"))
    assert not (tmp_path / "runs").exists()


def test_a_supernode_refuses_dp_sgd_in_bf16_on_its_cpu_naming_itself(tmp_path):
    """The same limit on a SuperNode (its runtime is its own: the node config's device, the
    run config's precision): its first message fails with the one message and the node's
    partition id (what the server's failure log shows), not torch's traceback mid-round;
    in fp32 the same node prepares."""
    from fedscore.config import dump_config
    from fedscore.flower.client_app import prepared

    node = {"partition-id": 1, "num-partitions": 2, "device": "cpu"}
    with pytest.raises(FedscoreError, match=r"partition-id=1: privacy mode sample .*fp32"):
        prepared(dump_config(dp_sgd_cfg(tmp_path, precision="bf16")), node)
    f = prepared(dump_config(dp_sgd_cfg(tmp_path, precision="fp32")), node)
    assert f.privacy is not None and f.privacy.mode == "sample"


@pytest.mark.parametrize("privacy", [
    {"mode": "client", "clip": 0.05, "noise_multiplier": 0.8},
    {"mode": "sample", "clip": 1.0, "noise_multiplier": 0.8},
], ids=["client", "sample"])
def test_a_pinned_noise_key_resumes_a_private_run_exactly(tmp_path, privacy):
    """With privacy.noise_seed the noise is keyed by (round, worker, step), not by how the
    run got there: two rounds, a resume to four, and four rounds straight are the same model,
    and epsilon is the same at every round (the accountant counts the resumed rounds)."""
    privacy = {**privacy, "noise_seed": 11, "delta": 1e-5}
    full = train_federated(fed_cfg(tmp_path, "full", privacy, rounds=4, strategy="sequential"),
                           progress=False)
    half = fed_cfg(tmp_path, "half", privacy, rounds=2, strategy="sequential")
    resumed = resumed_to(half, 4)
    for k, v in full.params.items():
        assert torch.equal(v, resumed.params[k]), k
    assert [r["epsilon"] for r in resumed.folder.metrics()] == pytest.approx(
        [r["epsilon"] for r in full.folder.metrics()], rel=1e-12)
    assert resumed.epsilon == pytest.approx(full.epsilon, rel=1e-12)
