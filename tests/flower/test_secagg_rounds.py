"""Whole SecAgg+ rounds of eq. 8 in this process: Flower's real `SecAggPlusWorkflow` on the
server side and the real ClientApp with `secaggplus_mod` on each node (secagg_harness's
LocalGrid stands in for the SuperLink). Equal to plain eq. 8 within the stated bound; the
server receives only masked vectors; dropouts within the threshold are survived."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedscore.config import dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.federated.aggregate import aggregate
from fedscore.federated.loop import run_rounds
from fedscore.federated.setup import model_setup, prepare, worker_round
from fedscore.flower import secure
from fedscore.flower.secure_transport import SecureFlowerTransport
from fedscore.runs.federated import train_federated
from run_records import records

sys.path.insert(0, str(Path(__file__).parent))
from clientapp_harness import client_round  # noqa: E402
from secagg_harness import LocalGrid, server_identity  # noqa: E402


def secure_config(tmp_path, workers=3, rounds=2, secure_aggregation=True, optimizer="adam",
                  policy="topk", **secagg):
    return load_config(
        name="secagg", out_dir=str(tmp_path / "runs"), seed=3, data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"steps": 20}, train={"eval_batch": 64},
        federation={"workers": workers, "rounds": rounds, "local_steps": 2,
                    "batch_size": 16, "lr": 1e-2, "policy": policy, "level": "M",
                    "optimizer": optimizer, "strategy": "sequential",
                    "secure_aggregation": secure_aggregation, "secagg": secagg})


def secure_run(cfg, grid, observe=None):
    """The ServerApp's loop over the secure transport; returns (theta_Q, round records)."""
    setup = model_setup(cfg)
    transport = SecureFlowerTransport(grid, setup, dump_config(cfg), start_wait=1.0,
                                      node_wait=1.0, poll=0.0, round_timeout=60.0,
                                      observe=observe)
    logged = []
    with server_identity():
        out = run_rounds(setup.init_params, transport, rounds=cfg.federation.rounds,
                         hooks=[lambda e: logged.append(e.record)])
    return out.params, logged


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every ClientApp runs; the reference must round alike
    yield
    torch.set_num_threads(threads)


def plain_reference(cfg):
    plain = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"secure_aggregation": False})})
    return train_federated(plain, progress=False)


def test_one_secure_round_equals_plain_eq8_within_the_quantisation_bound(tmp_path, one_thread):
    """Round 1 (Adam, top-k) of 3 workers through SecAgg+ == the in-process engine's plain
    eq. 8 within N·2c/(T·s) per coordinate (1.1e-5 with Flower's defaults)."""
    cfg = secure_config(tmp_path, rounds=1)
    params, (r,) = secure_run(cfg, LocalGrid(3))
    reference = plain_reference(cfg)
    bound = secure.quantization_bound(cfg.federation.secagg, 3)
    for k, v in reference.params.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=bound)
    (want,) = records(reference.folder.path)
    for key in ("coverage_hist", "min_coverage", "uncovered", "gamma_star"):
        assert r[key] == want[key]
    assert r["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert r["replies"] == 3 and not r["degraded"]
    assert r["secure_aggregation"]["count_residual_max"] < 0.5
    # what the server cannot know is recorded as unknown, not made up
    assert r["keep_fraction"] is None and r["w2"] is None and r["worker_loss"] is None
    # dense masked vectors: 2 D + 1 int64 per worker, more than a dense float32 model
    assert r["bytes_up_total"] > r["bytes_dense_fedavg_up_total"]
    assert set(r["secagg_bytes"]) == {"setup", "share_keys", "collect_masked_vectors",
                                      "unmask"}


def test_secure_rounds_equal_the_plain_run_within_the_summed_bounds(tmp_path, one_thread):
    """3 rounds with SGD and seeded random masks: the quantisation errors of the rounds add
    up (SGD does not magnify them; the masks do not depend on theta), so theta_Q is within
    about Q bounds of the plain run. (Adam magnifies them: m / sqrt(v) of a coordinate with
    tiny gradients, and a top-k mask may flip at a near-tie; docs/privacy.md.)"""
    cfg = secure_config(tmp_path, rounds=3, optimizer="sgd", policy="random")
    params, logged = secure_run(cfg, LocalGrid(3))
    reference = plain_reference(cfg)
    bound = secure.quantization_bound(cfg.federation.secagg, 3)
    for k, v in reference.params.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=2 * 3 * bound)
    want = records(reference.folder.path)
    assert [r["gamma_star"] for r in logged] == [r["gamma_star"] for r in want]
    for got, ref in zip(logged, want):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-4)


def test_the_server_receives_only_masked_vectors(tmp_path, one_thread):
    """Everything the server-side transport receives in round 1, at every SecAgg+ stage, is
    recorded; each worker's plain theta ⊙ m (recomputed here by running its eq. 7) appears
    nowhere: replies carry no float arrays, the masked vectors are uniform over SecAgg+'s
    2^32 ring (plain quantised values lie below T = 2^22), and read back as the server
    would dequantise them they are unrelated to any worker's values."""
    cfg = secure_config(tmp_path, rounds=1)
    seen = []
    secure_run(cfg, LocalGrid(3), observe=lambda stage, reply: seen.append((stage, reply)))
    assert {stage for stage, _ in seen} == {"setup", "share_keys", "collect_masked_vectors",
                                            "unmask"}

    f = prepare(cfg)
    sa = cfg.federation.secagg
    plain = []
    for pid in range(3):
        theta, mask, _, losses = worker_round(f, f.init_params, 0, pid)
        plain.append(secure.secure_vectors(theta, mask, float(losses.mean()), sa))

    c, t = sa.clipping_range, sa.quantization_range
    masked = []
    for stage, reply in seen:
        # no array record in any reply: the mod cleared the fit result's parameters
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        if stage != "collect_masked_vectors":
            continue
        arrays = [bytes_to_ndarray(b) for b in
                  reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert [a.shape for a in arrays] == [(1,), plain[0][0].shape, plain[0][1].shape, (1,)]
        masked.append(arrays)
        # what travels in the clear: partition id, round, timings, device; no values
        clear = dict(reply.content.config_records["fitres.metrics"])
        assert set(clear) == {"partition-id", "round", "train-seconds",
                              "process-age-seconds", "device"}
    assert len(masked) == 3
    for arrays in masked:
        values, mask = arrays[1], arrays[2]
        assert np.issubdtype(values.dtype, np.integer)
        assert (values >= t).mean() > 0.99 and (mask >= t).mean() > 0.99
        read = values * 2 * c / t - c  # the server dequantising a masked vector
        for vec in plain:
            assert not np.allclose(read, vec[0], atol=0.5)
            assert abs(np.corrcoef(read, vec[0])[0, 1]) < 0.1
            assert not np.array_equal(mask * 2 * c / t - c, vec[1])


@pytest.mark.parametrize("stage,survivors", [("setup", [0, 1]),
                                             ("share_keys", [0, 1]),
                                             ("collect_masked_vectors", [0, 1]),
                                             ("unmask", [0, 1, 2])])
def test_a_worker_dropping_out_mid_round_is_survived(tmp_path, one_thread, stage, survivors):
    """Worker 2 dies in one SecAgg+ stage of 3 workers (threshold 2): before sending its
    masked vector, the sum of the other two is unmasked (its pairwise masks recovered
    from its shares; lost before its key shares were sent, in the setup or share-keys
    stage, the setup is restarted without it); after, all three are. Eq. 8 over the
    workers whose vectors arrived, within the bound; the round logs the failure."""
    cfg = secure_config(tmp_path, rounds=1)
    params, (r,) = secure_run(cfg, LocalGrid(3, die={2: stage}))
    assert r["workers"] == survivors and r["replies"] == len(survivors)
    assert any(stage in why and "killed" in why for why in r["failed"].values())
    assert r["degraded"] == (stage != "unmask")

    f = prepare(cfg)
    outs = [worker_round(f, f.init_params, 0, pid) for pid in survivors]
    want, _ = aggregate(f.init_params, [o[0] for o in outs], [o[1] for o in outs])
    bound = secure.quantization_bound(cfg.federation.secagg, len(survivors))
    for k, v in want.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=bound)


def test_too_many_dropouts_leave_the_model_unchanged_and_the_run_goes_on(tmp_path, one_thread):
    """2 of 3 workers die: fewer than the threshold survive, SecAgg+ halts the round, the
    model stays theta_q and the round is logged as degraded with the reason."""
    cfg = secure_config(tmp_path, rounds=1)
    params, (r,) = secure_run(cfg, LocalGrid(3, die={1: "share_keys", 2: "share_keys"}))
    init = model_setup(cfg).init_params
    assert all(torch.equal(params[k], init[k]) for k in init)
    assert r["degraded"] and "halted" in r["secure_aggregation"]
    assert r["loss"] != r["loss"]  # NaN: no round loss


def test_a_worker_whose_values_do_not_fit_fails_its_reply_with_the_reason(tmp_path, one_thread):
    """scale so large that a worker's values leave the clipping range (theta_0 still fits):
    every worker refuses, naming the fix; SecAgg+ halts; the model is unchanged."""
    cfg = secure_config(tmp_path, rounds=1, scale=4.0, clipping_range=4.0)
    _, (r,) = secure_run(cfg, LocalGrid(3))
    assert r["failed"] and all("clipping range" in why for why in r["failed"].values())


def test_a_secure_runs_worker_refuses_a_plain_request(tmp_path):
    """A server that asks a secure run's worker for its plain update gets a refusal."""
    cfg = secure_config(tmp_path, rounds=1)
    f = model_setup(cfg)
    with pytest.raises(FedscoreError, match="only through SecAgg"):
        client_round(cfg, f.init_params, 0, {"partition-id": 0, "num-partitions": 3})
