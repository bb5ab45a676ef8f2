"""The in-process engine: every strategy equals the sequential oracle round after round;
level F is FedAvg; one full worker is centralised training."""

import copy

import pytest
import torch
from federated_oracle import OracleWorker, TinyScoreNet, oracle_round, tiny_loss

from fedscore.errors import FedscoreError
from fedscore.federated import (
    build_masks,
    choose_strategy,
    finish,
    level_ratios,
    make_loss_fn,
    make_optimizer,
    merge_sums,
    round_stats,
    round_sums,
    run_round,
    train_workers,
)
from fedscore.federated.engine import in_threads
from fedscore.federated.local import thread_replicas

DIM, B, S = 3, 5, 3


def _model(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = TinyScoreNet(DIM).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return model


def _batches(q, n_workers, seed=0, dtype=torch.float64):
    """Worker n's S batches of round q from its own generator (data + noise): (N, S, B, ...)."""
    xs, ts, es = [], [], []
    for n in range(n_workers):
        g = torch.Generator().manual_seed(1000 * seed + 100 * q + n)
        xs.append(torch.randn(S, B, DIM, generator=g, dtype=dtype) + n)  # non-iid workers
        ts.append(torch.rand(S, B, generator=g, dtype=dtype) * 0.9 + 0.05)
        es.append(torch.randn(S, B, DIM, generator=g, dtype=dtype))
    return torch.stack(xs), torch.stack(ts), torch.stack(es)


def _per_worker(batches, n):
    return [tuple(x[n, s] for x in batches) for s in range(S)]


def _masks(params, policy, ratios, q):
    gens = [torch.Generator().manual_seed(10_000 + 100 * q + n) for n in range(len(ratios))]
    return build_masks(params, policy, ratios, gens)


def _engine_run(model, policy, ratios, optimizer, lr, keep, strategy, rounds=3, chunk=None):
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state, history = None, []
    for q in range(rounds):
        masks = _masks(params, policy, ratios, q)
        params, coverage, stats, state, losses = run_round(
            params, masks, _batches(q, len(ratios)), loss_fn, make_optimizer(optimizer, lr=lr),
            steps=S, state=state if keep else None, strategy=strategy, chunk_size=chunk,
        )
        history.append((coverage, stats, losses))
    return params, history


def _oracle_run(model, policy, ratios, optimizer, lr, keep, rounds=3):
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    workers = [OracleWorker(params, optimizer, lr, keep_state=keep) for _ in ratios]
    history = []
    for q in range(rounds):
        stacked = _masks(params, policy, ratios, q)
        masks = [{k: v[n] for k, v in stacked.items()} for n in range(len(ratios))]
        batches = _batches(q, len(ratios))
        params, coverage, losses = oracle_round(
            workers, params, masks, [_per_worker(batches, n) for n in range(len(ratios))],
            loss_fn,
        )
        history.append((coverage, losses))
    return params, history


CASES = [  # (optimizer, lr, keep Adam state across rounds)
    ("sgd", 0.05, False),
    ("adam", 0.02, False),
    ("adam", 0.02, True),
]


@pytest.mark.parametrize("policy", ["random", "topk"])
@pytest.mark.parametrize(("optimizer", "lr", "keep"), CASES)
def test_every_strategy_equals_the_sequential_oracle_after_three_rounds(
    policy, optimizer, lr, keep
):
    model = _model()
    # no full worker: top-k masks are nested, so the smallest 10% of coordinates go uncovered
    ratios = [0.9, 0.75, 0.5, 0.3, 0.3]
    want, want_hist = _oracle_run(model, policy, ratios, optimizer, lr, keep)
    runs = {s: _engine_run(model, policy, ratios, optimizer, lr, keep, s)
            for s in ("vmap", "sequential", "threads")}
    runs["chunked"] = _engine_run(model, policy, ratios, optimizer, lr, keep, "chunked", chunk=2)
    start = dict(model.named_parameters())
    for strategy, (params, hist) in runs.items():
        for k in want:
            torch.testing.assert_close(params[k], want[k], rtol=1e-9, atol=1e-11,
                                       msg=f"{strategy} {k}")
            assert not torch.allclose(params[k], start[k])  # training did move every tensor
        for (coverage, stats, losses), (want_cov, want_losses) in zip(hist, want_hist):
            assert all(torch.equal(coverage[k], want_cov[k]) for k in want)
            assert losses.shape == (len(ratios), S)
            torch.testing.assert_close(losses, torch.tensor(want_losses, dtype=torch.float64))
            assert stats["min_coverage"] == min(int(c.min()) for c in coverage.values())
    if policy == "topk":  # the uncovered path ("keep") was exercised
        assert all(stats["uncovered"] > 0 for _, stats, _ in runs["vmap"][1])


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adam", 0.02)])
def test_level_f_with_full_masks_is_fedavg(optimizer, lr):
    """FedAvg written the way research code does it: deepcopy the model per worker, train
    with torch.optim, average the state dicts."""
    model = _model(1)
    n = 4
    ratios = level_ratios("F", n)
    params, _ = _engine_run(model, "full", ratios, optimizer, lr, False, "auto", rounds=2)
    global_model = copy.deepcopy(model)
    for q in range(2):
        batches = _batches(q, n)
        locals_ = []
        for w in range(n):
            local = copy.deepcopy(global_model)
            opt = (torch.optim.SGD(local.parameters(), lr=lr) if optimizer == "sgd"
                   else torch.optim.Adam(local.parameters(), lr=lr))
            for batch in _per_worker(batches, w):
                opt.zero_grad()
                tiny_loss(local, batch).backward()
                opt.step()
            locals_.append(local.state_dict())
        global_model.load_state_dict(
            {k: sum(sd[k] for sd in locals_) / n for k in locals_[0]})
    for k, v in global_model.state_dict().items():
        torch.testing.assert_close(params[k], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("optimizer", "lr", "keep"), [("sgd", 0.05, False), ("adam", 0.02, True)])
def test_one_full_worker_is_centralised_training_on_its_batches(optimizer, lr, keep):
    model = _model(2)
    rounds = 3
    params, hist = _engine_run(model, "full", level_ratios("F", 1), optimizer, lr, keep,
                               "vmap", rounds=rounds)
    central = copy.deepcopy(model)
    opt = (torch.optim.SGD(central.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(central.parameters(), lr=lr))
    for q in range(rounds):  # Q * S steps in a row, one optimiser throughout
        for batch in _per_worker(_batches(q, 1), 0):
            opt.zero_grad()
            tiny_loss(central, batch).backward()
            opt.step()
    for k, v in central.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-10, atol=1e-12)
    assert all(stats["min_coverage"] == 1 and stats["w2"] == 0.0 for _, stats, _ in hist)


def test_the_score_mlp_and_the_dsm_loss_run_alike_under_vmap_and_the_loop():
    from fedscore import diffusion
    from fedscore.models import ScoreMLP

    model = ScoreMLP(dim=2, hidden=16, depth=1, time_dim=8)
    times = diffusion.time_grid("uniform", steps=20, T=1.0, delta=1e-2)

    def loss(net, batch):
        x0, t, eps = batch
        return diffusion.dsm_loss(lambda x, tt: net(x, tt), x0, t, eps)

    loss_fn = make_loss_fn(model, loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert choose_strategy(params) == "vmap"
    n, g = 3, torch.Generator().manual_seed(0)
    x0 = torch.randn(n, S, 8, 2, generator=g)
    t, eps = diffusion.draw_noise(x0.reshape(-1, 2), times, generator=g)
    batches = (x0, t.reshape(n, S, 8), eps.reshape(n, S, 8, 2))
    masks = _masks(params, "topk", level_ratios([1.0, 0.8, 0.75]), 0)
    out = {s: run_round(params, masks, batches, loss_fn, make_optimizer("adam", lr=1e-3),
                        steps=S, strategy=s) for s in ("vmap", "sequential")}
    for k in params:  # float32: vmap's batched kernels may sum in another order
        torch.testing.assert_close(out["vmap"][0][k], out["sequential"][0][k],
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["vmap"][4], out["sequential"][4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "sequential"])
def test_workers_keep_pruned_coordinates_zero_with_leftover_adam_moments(strategy):
    model = _model(3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = 3
    masks = _masks(params, "random", [0.3, 0.5, 0.9], 0)
    g = torch.Generator().manual_seed(0)
    d = sum(v.numel() for v in params.values())
    state = {  # large moments everywhere, as left from rounds where these coords were kept
        "m": torch.randn(n, d, generator=g, dtype=torch.float64),
        "v": torch.rand(n, d, generator=g, dtype=torch.float64),
        "step": torch.tensor([5, 5, 5]),
    }
    workers, new_state, losses = train_workers(
        params, masks, _batches(0, n), make_loss_fn(model, tiny_loss),
        make_optimizer("adam", lr=0.1), steps=S, state=state, strategy=strategy, chunk_size=2,
    )
    for k in params:
        assert workers[k].shape == (n, *params[k].shape)
        assert bool((workers[k][~masks[k]] == 0).all()), k
        assert bool((workers[k][masks[k]] != params[k].expand(n, *params[k].shape)[masks[k]]).any())
    assert new_state["step"].tolist() == [5 + S] * n
    assert losses.shape == (n, S)


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_a_round_is_bit_identical_whatever_the_order_of_the_params_dict(strategy):
    """A checkpoint hands names back sorted, a model in module order: resuming must not
    change a single bit (float32, where kernels could round differently on other layouts)."""
    model = _model(5, dtype=torch.float32)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    backwards = dict(reversed(list(params.items())))
    batches = _batches(0, 3, dtype=torch.float32)
    out = [run_round(p, _masks(p, "random", [1.0, 0.6, 0.4], 0), batches, loss_fn,
                     make_optimizer("adam", lr=0.02), steps=S, strategy=strategy)
           for p in (params, backwards)]
    assert list(out[1][0]) == list(backwards)  # handed back in the caller's order
    assert all(torch.equal(out[0][0][k], out[1][0][k]) for k in params)
    assert all(torch.equal(out[0][3][k], out[1][3][k]) for k in ("m", "v", "step"))


@pytest.mark.parametrize("uncovered", ["keep", "zero"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_run_round_is_round_sums_then_finish_then_round_stats(optimizer, uncovered):
    """What a round loop with a transport does by hand gives run_round's numbers bit for bit."""
    model = _model(6, dtype=torch.float32)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = _masks(params, "topk", [0.9, 0.5, 0.3], 0)  # nested: some coordinates uncovered
    batches = _batches(0, 3, dtype=torch.float32)
    opt = make_optimizer(optimizer, lr=0.02)
    new, coverage, stats, state, losses = run_round(params, masks, batches, loss_fn, opt,
                                                    uncovered=uncovered)
    sums, counts, state2, losses2 = round_sums(params, masks, batches, loss_fn, opt)
    again, coverage2 = finish(params, sums, counts, uncovered)
    assert stats["uncovered"] > 0
    assert list(again) == list(new) and all(torch.equal(again[k], new[k]) for k in new)
    assert all(torch.equal(coverage2[k], coverage[k]) for k in coverage)
    assert round_stats(params, masks, counts) == stats
    assert all(torch.equal(state2[k], state[k]) for k in state) and torch.equal(losses2, losses)
    assert all(sums[k].shape == v.shape and counts[k].dtype == torch.long
               for k, v in params.items())


def test_round_sums_of_disjoint_groups_of_workers_add_up_to_the_round():
    """Eq. 8's statistic is mergeable: two transports (or two Flower replies) each running
    some of the workers give, added, the sums and counts of all of them."""
    model = _model(7)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = _masks(params, "random", [1.0, 0.75, 0.5, 0.3, 0.3], 0)
    batches = _batches(0, 5)
    opt = make_optimizer("adam", lr=0.02)
    whole = round_sums(params, masks, batches, loss_fn, opt)
    parts = [round_sums(params, {k: v[g] for k, v in masks.items()},
                        tuple(x[g] for x in batches), loss_fn, opt)[:2]
             for g in (slice(0, 2), slice(2, 5))]
    sums, counts = merge_sums(*parts)
    for k in params:
        assert torch.equal(counts[k], whole[1][k])
        torch.testing.assert_close(sums[k], whole[0][k], rtol=1e-12, atol=1e-12)


def test_auto_vmaps_small_dense_models_and_loops_over_conv_or_large_ones_on_cpu():
    small = {"w": torch.zeros(64, 64), "b": torch.zeros(64)}
    conv = {"conv.weight": torch.zeros(8, 3, 3, 3), "b": torch.zeros(8)}
    large = {"w": torch.zeros(1000, 1000)}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert choose_strategy(small) == "vmap"
        assert choose_strategy(conv) == "sequential"
        assert choose_strategy(large) == "sequential"
        torch.set_num_threads(2)  # a second core: workers side by side, one thread each
        assert choose_strategy(conv) == choose_strategy(large) == "threads"
        assert choose_strategy(conv, n=1) == "sequential" and choose_strategy(small) == "vmap"
    finally:
        torch.set_num_threads(before)


def test_the_threads_strategy_gives_each_thread_its_own_module_and_restores_torch_threads():
    model = _model()
    get = thread_replicas(model)
    assert get() is model  # the owner thread runs the module itself
    seen = in_threads(lambda i: get(), 4, threads=2)
    assert all(m is not model for m in seen)  # any other thread its own copy of it
    assert all(torch.equal(a, b) for m in seen
               for a, b in zip(m.parameters(), model.parameters(), strict=True))
    before = torch.get_num_threads()
    assert in_threads(lambda i: (i, torch.get_num_threads()), 3, threads=2) == [
        (0, 1), (1, 1), (2, 1)]  # one intra-op thread per worker inside the pool
    assert torch.get_num_threads() == before
    # grad mode and autocast are thread-local: the pool runs in the caller's (a sampler's
    # no_grad + bf16 autocast reaches the agents it evaluates side by side)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        modes = in_threads(lambda i: (torch.is_grad_enabled(),
                                      (torch.ones(2, 2) @ torch.ones(2, 2)).dtype), 2, threads=2)
    assert modes == [(False, torch.bfloat16)] * 2
    assert in_threads(lambda i: torch.is_grad_enabled(), 2, threads=2) == [True, True]


def test_bad_round_arguments_are_refused():
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = make_loss_fn(model, tiny_loss)
    masks = _masks(params, "topk", [1.0, 0.5], 0)
    sgd, adam = make_optimizer("sgd", lr=0.1), make_optimizer("adam", lr=0.1)
    with pytest.raises(FedscoreError, match="unknown engine strategy 'processes'"):
        run_round(params, masks, _batches(0, 2), loss_fn, sgd, strategy="processes")
    with pytest.raises(FedscoreError, match="3 workers on its leading axis but masks have 2"):
        run_round(params, masks, _batches(0, 3), loss_fn, sgd)
    with pytest.raises(FedscoreError, match="between 1 and the 3 batches"):
        run_round(params, masks, _batches(0, 2), loss_fn, sgd, steps=4)
    _, _, _, state, _ = run_round(params, masks, _batches(0, 2), loss_fn, adam)
    with pytest.raises(FedscoreError, match="saved by another optimiser"):
        run_round(params, masks, _batches(0, 2), loss_fn, sgd, state=state)
    three = _masks(params, "topk", [1.0, 0.5, 0.5], 0)
    with pytest.raises(FedscoreError, match=r"'m' has shape \(2, \d+\), expected \(3,"):
        run_round(params, three, _batches(0, 3), loss_fn, adam, state=state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_round_on_cuda_equals_the_cpu_loop():
    model = _model(4)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = _masks(params, "random", [1.0, 0.6, 0.4], 0)
    batches = _batches(0, 3)
    adam = make_optimizer("adam", lr=0.02)
    cpu = run_round(params, masks, batches, loss_fn, adam, steps=S, strategy="sequential")
    cuda_loss = make_loss_fn(copy.deepcopy(model).cuda(), tiny_loss)
    gpu = run_round({k: v.cuda() for k, v in params.items()},
                    {k: v.cuda() for k, v in masks.items()},
                    tuple(x.cuda() for x in batches), cuda_loss, adam, steps=S,
                    strategy="auto")
    assert choose_strategy({k: v.cuda() for k, v in params.items()}) == "vmap"
    for k in params:
        torch.testing.assert_close(gpu[0][k].cpu(), cpu[0][k], rtol=1e-9, atol=1e-11)
    assert gpu[2]["coverage_hist"] == cpu[2]["coverage_hist"]
    assert gpu[2]["w2"] == pytest.approx(cpu[2]["w2"], rel=1e-12)
