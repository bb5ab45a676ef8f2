"""A round's batches drawn per local step (`federated.batches.RoundBatches`): each (worker,
step) depends only on its seed, whatever the order of access or the engine strategy, and no
engine call holds more than one step of a chunk of workers."""

from dataclasses import dataclass, field

import pytest
import torch

from fedscore import federated
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.federated.batches import RoundBatches
from fedscore.federated.seeding import step_seed
from fedscore.federated.setup import draw_batches, prepare, round_batches
from fedscore.runtime import Runtime
from fedscore.theory.estimate import gradients

N, S, B = 4, 3, 6


def _cfg(**fed):
    return load_config(**{
        "data": {"name": "gmm:ring8"}, "model": {"options": {"hidden": 16, "depth": 1}},
        "diffusion": {"steps": 10},
        "federation": {"workers": N, "rounds": 1, "local_steps": S, "batch_size": B,
                       "policy": "random", "level": "M", "optimizer": "adam", **fed},
    })


@pytest.fixture(scope="module")
def setup():
    return prepare(_cfg())


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_a_draw_depends_only_on_its_round_worker_and_step(setup):
    f = setup
    rb = f.batches(2, list(range(N)))
    forward = {(n, s): rb[n, s] for n in range(N) for s in range(S)}
    fresh = f.batches(2, list(range(N)))  # a resumed run: a new source, backwards
    for n in reversed(range(N)):
        for s in reversed(range(S)):
            _equal(fresh[n, s], forward[n, s])
            _equal(fresh[n][s], forward[n, s])
    for s in range(S):  # a step of a group of workers stacks the single draws
        group = rb[1:3, s]
        assert group[0].shape == (2, B, 2)
        for i, n in enumerate((1, 2)):
            _equal(tuple(v[i] for v in group), forward[n, s])
    for n in range(N):  # a SuperNode drawing only its own worker
        own = f.batches(2, [n])[0]
        for s in range(S):
            _equal(own[s], forward[n, s])
    # and the draws are fresh per worker, step and round
    x = {k: v[0] for k, v in forward.items()}
    assert not torch.equal(x[0, 0], x[0, 1]) and not torch.equal(x[0, 0], x[1, 0])
    assert not torch.equal(f.batches(3, [0])[0][0][3], forward[0, 0][3])


def test_draw_batches_is_the_lazy_source_materialised(setup):
    f = setup
    lazy = round_batches(f.images, f.labels, f.parts, S, B, f.times, "eps", 5, 1)
    x0, y, t, eps = draw_batches(f.images, f.labels, f.parts, S, B, f.times, "eps", 5, 1)
    assert x0.shape == eps.shape == (N, S, B, 2) and y.shape == t.shape == (N, S, B)
    for n in range(N):
        for s in range(S):
            _equal((x0[n, s], y[n, s], t[n, s], eps[n, s]), lazy[n, s])
    # each drawn row is one of the worker's own items, its noise the t of a grid point
    for n in range(N):
        own = f.images[f.parts[n]]
        assert all((own == row).all(-1).any() for row in x0[n].flatten(0, 1))
    assert torch.isin(t, f.times.to(t.dtype)).all()


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "sequential"])
def test_a_round_on_the_lazy_source_is_the_round_on_its_predrawn_batches(setup, strategy):
    f = setup
    params, workers = f.init_params, list(range(N))
    masks = f.masks(params, 0, workers)
    lazy = f.batches(0, workers)
    reference, *_ = federated.run_round(params, masks, lazy.materialise(), f.loss_fn,
                                        f.optimizer(), strategy="sequential")
    new, _, _, _, losses = federated.run_round(params, masks, lazy, f.loss_fn, f.optimizer(),
                                               strategy=strategy, chunk_size=3)
    assert losses.shape == (N, S)
    for k in params:
        torch.testing.assert_close(new[k], reference[k], rtol=1e-5, atol=1e-6)


@dataclass(frozen=True, eq=False)
class _Counting(RoundBatches):
    """RoundBatches that logs every draw into a shared list."""

    log: list = field(default_factory=list)

    def draw(self, slot, step):
        self.log.append(("draw", self.workers[slot], step))
        return super().draw(slot, step)


@pytest.mark.parametrize(("strategy", "held"), [("vmap", N), ("chunked", 3), ("sequential", 1)])
def test_the_engine_draws_each_worker_step_once_and_never_ahead_of_the_step(
        setup, strategy, held):
    f = setup
    log = []
    source = _Counting(f.images, f.labels, f.parts, list(range(N)), S, B, f.times, "eps",
                       0, 0, log=log)

    def loss_fn(params, batch):
        log.append(("loss", tuple(batch[0].shape)))
        return f.loss_fn(params, batch)

    masks = f.masks(f.init_params, 0, list(range(N)))
    federated.run_round(f.init_params, masks, source, loss_fn, f.optimizer(),
                        strategy=strategy, chunk_size=3)
    draws = [e[1:] for e in log if e[0] == "draw"]
    assert sorted(draws) == [(n, s) for n in range(N) for s in range(S)]  # each once
    # batches drawn but not yet trained on, at any moment: one step of one chunk at most
    waiting, most = 0, 0
    for event in log:
        waiting = waiting + 1 if event[0] == "draw" else 0
        most = max(most, waiting)
    assert most == held
    assert all(e[1] == (B, 2) for e in log if e[0] == "loss")  # one worker's one step


def test_worker_round_trains_on_the_engines_draws_one_step_at_a_time(setup):
    f = setup
    params = f.init_params
    masks = f.masks(params, 1, list(range(N)))
    _, _, _, _, losses = federated.run_round(params, masks, f.batches(1, list(range(N))),
                                             f.loss_fn, f.optimizer(), strategy="vmap")
    for n in range(N):
        *_, worker_losses = federated.setup.worker_round(f, params, 1, n)
        torch.testing.assert_close(worker_losses, losses[n], rtol=1e-5, atol=1e-6)


def test_the_theory_estimator_reads_the_lazy_source_as_the_predrawn_one(setup):
    f = setup
    lazy = f.batches(0, [0, 2])
    g_lazy, l_lazy = gradients(f.loss_fn, f.init_params, lazy)
    g_full, l_full = gradients(f.loss_fn, f.init_params, lazy.materialise())
    assert g_lazy.shape == (2, S, g_lazy.shape[-1])
    torch.testing.assert_close(g_lazy, g_full)
    torch.testing.assert_close(l_lazy, l_full)


def test_step_seeds_are_distinct_and_fit_a_torch_generator():
    seeds = {step_seed(r, q, n, s) for r in (0, 2**40) for q in range(3) for n in range(10)
             for s in range(200)}
    assert len(seeds) == 2 * 3 * 10 * 200
    assert all(0 <= x < 2**63 for x in seeds)
    torch.Generator().manual_seed(max(seeds))


def test_bad_indices_are_refused(setup):
    rb = setup.batches(0, [0, 1])
    with pytest.raises(FedscoreError, match="step 3 out of range"):
        rb[0, S]
    with pytest.raises(FedscoreError, match="worker 2 out of range"):
        rb[2]
    with pytest.raises(FedscoreError, match="axis 2"):
        rb.leading_size(2)
    with pytest.raises(FedscoreError, match="partitions for"):
        RoundBatches(rb.images, rb.labels, rb.parts, [0], S, B, rb.times, "eps", 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_setup_holds_its_data_there_and_draws_the_cpu_numbers():
    cpu = prepare(_cfg())
    gpu = prepare(_cfg(), runtime=Runtime(torch.device("cuda"), "fp32"))
    assert gpu.images.is_cuda and all(p.is_cuda for p in gpu.parts)
    for s in range(S):
        on_gpu = gpu.batches(0, [1])[0][s]
        assert all(v.is_cuda for v in on_gpu)
        _equal(tuple(v.cpu() for v in on_gpu), cpu.batches(0, [1])[0][s])
