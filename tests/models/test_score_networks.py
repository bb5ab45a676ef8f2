"""Score networks keep the input's shape and run under functional_call + vmap + grad, as the
federated engine and the batched agents need."""

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from fedscore.errors import FedscoreError
from fedscore.models import build_model, count_params, ema_update


def tiny_unet(channels=1, size=28, classes=None, seed=0):
    torch.manual_seed(seed)
    return build_model("unet", size="tiny", in_channels=channels, image_size=size,
                       num_classes=classes)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_unet_output_shape_equals_input_shape(channels, size):
    net = tiny_unet(channels, size)
    x = torch.randn(3, channels, size, size)
    assert net(x, torch.rand(3) + 1e-3).shape == x.shape


def test_named_sizes_have_the_stated_parameter_counts():
    assert 300_000 < count_params(tiny_unet()) < 1_000_000
    small = build_model("unet", size="small", in_channels=1, image_size=28)
    assert 2_000_000 < count_params(small) < 4_000_000
    with torch.device("meta"):
        paper = build_model("unet", size="paper", in_channels=3, image_size=32)
    assert 30_000_000 < count_params(paper) < 40_000_000


def _copies(make, n=3):
    nets = [make(seed=i) for i in range(n)]
    params, buffers = stack_module_state(nets)
    base = make(seed=0)
    return nets, params, buffers, base


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_vmap_over_stacked_copies_equals_separate_calls(kind):
    if kind == "unet":
        def make(seed):
            return tiny_unet(1, 8, classes=10, seed=seed)
        x = torch.randn(3, 4, 1, 8, 8)
    else:
        def make(seed):
            torch.manual_seed(seed)
            return build_model("mlp", dim=2, num_classes=10)
        x = torch.randn(3, 4, 2)
    nets, params, buffers, base = _copies(make)
    t = torch.rand(3, 4) + 1e-3
    y = torch.randint(0, 10, (3, 4))

    def call(p, b, xi, ti, yi):
        return functional_call(base, (p, b), (xi, ti, yi))

    stacked = vmap(call)(params, buffers, x, t, y)
    shared = vmap(call, in_dims=(0, 0, None, None, None))(params, buffers, x[0], t[0], y[0])
    for i, net in enumerate(nets):
        assert torch.allclose(stacked[i], net(x[i], t[i], y[i]), atol=1e-5)
        assert torch.allclose(shared[i], net(x[0], t[0], y[0]), atol=1e-5)


def test_per_copy_gradients_under_vmap_match_autograd():
    def make(seed):
        return tiny_unet(1, 8, seed=seed)

    nets, params, buffers, base = _copies(make, 2)
    x, t = torch.randn(2, 3, 1, 8, 8), torch.rand(2, 3) + 1e-3

    def loss(p, b, xi, ti):
        return functional_call(base, (p, b), (xi, ti)).pow(2).mean()

    grads = vmap(grad(loss))(params, buffers, x, t)
    for i, net in enumerate(nets):
        net.zero_grad()
        net(x[i], t[i]).pow(2).mean().backward()
        for name, p in net.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-5), name


def test_class_conditional_nets_take_labels_and_no_label():
    net = tiny_unet(1, 8, classes=10)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    a, b = net(x, t, torch.tensor([1, 2])), net(x, t, None)
    assert a.shape == b.shape == x.shape and not torch.allclose(a, b)


def test_an_image_size_the_unet_cannot_take_is_a_clear_error():
    with pytest.raises(FedscoreError, match="multiple of 4"):
        tiny_unet(1, 30)
    with pytest.raises(FedscoreError, match="multiple of 8"):
        build_model("unet", size="paper", in_channels=1, image_size=28)
    with pytest.raises(FedscoreError, match="tiny"):
        build_model("unet", size="huge", in_channels=1, image_size=28)
    with pytest.raises(FedscoreError, match="mlp"):
        build_model("transformer")


def test_ema_update_is_the_exponential_average():
    ema = {"w": torch.tensor([1.0, 2.0])}
    out = ema_update(ema, {"w": torch.tensor([3.0, 6.0])}, decay=0.75)
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))
