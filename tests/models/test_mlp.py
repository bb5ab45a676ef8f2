"""The score MLP: shape contract, vmap/grad over stacked copies, labels, and a time
embedding that resolves the small times the samplers end at."""

import math

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from fedscore.errors import FedscoreError
from fedscore.models import ScoreMLP, build_model, count_params, time_embedding


def mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("mlp", **{"dim": 2, "hidden": 32, "depth": 2, **kw})


def test_output_shape_equals_input_shape_and_default_size():
    x = torch.randn(5, 3)
    assert ScoreMLP(3)(x, torch.rand(5) + 1e-3).shape == x.shape
    assert 100_000 < count_params(ScoreMLP(2)) < 150_000  # hidden 128, depth 3
    assert 15_000 < count_params(mlp()) < 20_000  # the engine benchmark's small MLP


def test_vmap_over_stacked_copies_equals_separate_calls_and_autograd():
    nets = [mlp(seed=i, num_classes=4) for i in range(3)]
    params, buffers = stack_module_state(nets)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 6, 2, generator=g), torch.rand(3, 6, generator=g) + 5e-5
    y = torch.randint(0, 4, (3, 6), generator=g)

    def call(p, b, xi, ti, yi):
        return functional_call(nets[0], (p, b), (xi, ti, yi))

    per_copy = vmap(call)(params, buffers, x, t, y)
    shared = vmap(call, in_dims=(0, 0, None, None, None))(params, buffers, x[0], t[0], y[0])
    grads = vmap(grad(lambda p, b, xi, ti, yi: call(p, b, xi, ti, yi).pow(2).sum()))(
        params, buffers, x, t, y)
    for i, net in enumerate(nets):
        torch.testing.assert_close(per_copy[i], net(x[i], t[i], y[i]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared[i], net(x[0], t[0], y[0]), atol=1e-5, rtol=1e-5)
        net.zero_grad()
        net(x[i], t[i], y[i]).pow(2).sum().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-5, rtol=1e-4)


def test_no_label_means_the_null_label():
    net = mlp(num_classes=4)
    x, t = torch.randn(3, 2), torch.full((3,), 0.1)
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), 4)))
    assert not torch.allclose(net(x, t), net(x, t, torch.tensor([0, 1, 2])))


def test_time_embedding_is_sin_cos_of_log_t():
    t = torch.tensor([1e-3, 1.0, 7.0])
    emb = time_embedding(t, 8)
    w = 4.0 * torch.exp(-torch.arange(4) * math.log(1e3) / 4)  # the documented frequencies
    c = torch.log(t)[:, None] * w
    torch.testing.assert_close(emb, torch.cat([c.sin(), c.cos()], 1))


def test_time_embedding_separates_small_times_and_survives_t_zero():
    # 5e-5 and 1e-4 (two early-stopping deltas) are 4 log 2 = 2.8 rad apart in the fastest
    # feature; on a linear 1000 t scale they would be 0.05 rad apart
    a, b = time_embedding(torch.tensor([5e-5, 1e-4]), 64)
    assert (a - b).abs().max() > 0.5
    assert torch.isfinite(time_embedding(torch.tensor([0.0]), 64)).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"time_dim": 7}, "even"),
    ({"hidden": 0}, "hidden must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_mlp_settings_are_clear_errors(kwargs, match):
    with pytest.raises(FedscoreError, match=match):
        ScoreMLP(2, **kwargs)
