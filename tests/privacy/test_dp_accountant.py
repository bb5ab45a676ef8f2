"""Epsilon is Opacus' own: fedscore's accounting equals RDPAccountant / PRVAccountant run
directly for the same (z, sampling rate, steps, delta), and a target epsilon is solved to a
noise multiplier that meets it."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.privacy import epsilon, noise_for, plan_for


def opacus_epsilon(cls, z, q, steps, delta):
    acc = cls()
    for _ in range(steps):  # Opacus' own way: one step() per mechanism
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize(("name", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
@pytest.mark.parametrize(("z", "q", "steps"), [(1.1, 1.0, 20), (0.8, 0.05, 300)])
def test_epsilon_equals_opacus_accountant(name, cls, z, q, steps):
    ours = epsilon(z, q, steps, 1e-5, name)
    theirs = opacus_epsilon(cls, z, q, steps, 1e-5)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_epsilon_grows_with_steps_and_falls_with_noise():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    eps = [epsilon(1.0, 0.1, t, 1e-5) for t in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon(2.0, 0.1, 100, 1e-5) < eps[2]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("target", "q", "steps"), [(8.0, 1.0, 10), (1.0, 0.02, 200)])
def test_target_epsilon_solves_to_a_noise_multiplier_that_meets_it(accountant, target, q,
                                                                   steps):
    z = noise_for(target, q, steps, 1e-5, accountant)
    got = epsilon(z, q, steps, 1e-5, accountant)
    assert got <= target + 1e-9
    assert got >= target - 0.05  # close: the bisection's tolerance, not a loose bound
    assert epsilon(z * 0.95, q, steps, 1e-5, accountant) > got


def test_an_unreachable_target_is_one_error():
    with pytest.raises(FedscoreError, match="target_epsilon"):
        noise_for(1e-7, 1.0, 1000, 1e-5)


def private_cfg(**privacy):
    return load_config(None, data={"name": "gmm:ring8"},
                       federation={"workers": 4, "rounds": 5, "batch_size": 16},
                       privacy=privacy)


def test_plan_counts_rounds_in_client_mode_and_local_steps_per_worker_in_sample_mode():
    client = plan_for(private_cfg(mode="client", clip=1.0, noise_multiplier=1.2))
    assert client.epsilon(3) == pytest.approx(epsilon(1.2, 1.0, 3, 1e-5))
    sizes = [100, 200, 400, 800]
    sample = plan_for(private_cfg(mode="sample", clip=1.0, noise_multiplier=1.2), sizes, 7)
    per_worker = sample.worker_epsilons(2)
    for n, size in enumerate(sizes):
        assert per_worker[n] == pytest.approx(epsilon(1.2, 16 / size, 14, 1e-5))
    assert sample.epsilon(2) == max(per_worker) == per_worker[0]  # the smallest worker


def test_plan_solves_z_for_the_worker_with_the_largest_sampling_rate():
    plan = plan_for(private_cfg(mode="sample", clip=1.0, target_epsilon=4.0), [64, 640], 5)
    assert plan.solved and math.isfinite(plan.noise_multiplier)
    assert plan.epsilon(plan.rounds) <= 4.0 + 1e-9
    assert plan.summary()["planned_epsilon"] == pytest.approx(plan.epsilon(5))
