"""The U-Net keeps the input's shape at the sizes the data sets have, and runs under
functional_call + vmap + grad over stacked parameters, as the federated engine needs."""

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from fedscore.errors import FedscoreError
from fedscore.models import UNet, build_model, count_params

# small enough for fast vmap tests, with attention in a res block AND in the middle
SMALL = {"base": 8, "groups": 4, "attn_resolutions": (4,)}


def unet(size=8, classes=None, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("unet", size="tiny", in_channels=1, image_size=size,
                       num_classes=classes, **{**SMALL, **kw})


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_tiny_unet_output_shape_equals_input_shape(channels, size):
    torch.manual_seed(0)
    net = build_model("unet", size="tiny", in_channels=channels, image_size=size,
                      num_classes=10)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([1e-3, 5.0]), torch.tensor([3, 7]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_named_sizes_have_the_stated_parameter_counts():
    tiny = build_model("unet", size="tiny", in_channels=1, image_size=28)
    assert 500_000 <= count_params(tiny) <= 800_000
    with torch.device("meta"):  # no memory, no init time
        small = build_model("unet", size="small", in_channels=3, image_size=32)
        paper28 = build_model("unet", size="paper", in_channels=1, image_size=28)
        paper32 = build_model("unet", size="paper", in_channels=3, image_size=32)
    assert 2_000_000 <= count_params(small) <= 4_000_000
    assert 33_000_000 <= count_params(paper32) <= 37_000_000
    # the paper size takes 28x28 (it halves twice) and has attention at half the side
    assert paper28.down[3].attn is not None and paper28.down[0].attn is None


def test_fewer_halvings_than_levels_keep_the_shape():
    # 4 levels but 2 halvings (the paper preset's layout) on a 28x28 input
    torch.manual_seed(0)
    net = UNet(1, 28, base=8, channel_mults=(1, 2, 2, 2), num_res_blocks=1, groups=4,
               num_downsamples=2, attn_resolutions=(7,))
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.rand(2) + 1e-3).shape == x.shape


def _stacked(make, n=3):
    nets = [make(seed=i) for i in range(n)]
    params, buffers = stack_module_state(nets)
    return nets, params, buffers


def test_vmap_over_three_stacked_copies_equals_three_separate_calls():
    nets, params, buffers = _stacked(lambda seed: unet(classes=10, seed=seed))
    assert not torch.allclose(params["inp.weight"][0], params["inp.weight"][1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 1, 8, 8, generator=g)
    t = torch.rand(3, 4, generator=g) * 5 + 5e-5
    y = torch.randint(0, 10, (3, 4), generator=g)

    def call(p, b, xi, ti, yi):
        return functional_call(nets[0], (p, b), (xi, ti, yi))

    per_copy = vmap(call)(params, buffers, x, t, y)
    shared = vmap(call, in_dims=(0, 0, None, None, None))(params, buffers, x[0], t[0], y[0])
    no_label = vmap(call, in_dims=(0, 0, None, None, None))(params, buffers, x[0], t[0], None)
    for i, net in enumerate(nets):
        torch.testing.assert_close(per_copy[i], net(x[i], t[i], y[i]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared[i], net(x[0], t[0], y[0]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(no_label[i], net(x[0], t[0]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(shared[0], shared[1])  # the copies really differ


def test_per_copy_gradients_under_vmap_equal_autograd_of_each_copy():
    nets, params, buffers = _stacked(lambda seed: unet(classes=3, seed=seed), n=2)
    x, t = torch.randn(2, 3, 1, 8, 8), torch.rand(2, 3) + 1e-3
    y = torch.tensor([[0, 1, 2], [2, 2, 0]])

    def loss(p, b, xi, ti, yi):
        return functional_call(nets[0], (p, b), (xi, ti, yi)).pow(2).mean()

    grads = vmap(grad(loss))(params, buffers, x, t, y)
    for i, net in enumerate(nets):
        net.zero_grad()
        net(x[i], t[i], y[i]).pow(2).mean().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=name)


def test_no_label_is_the_null_label_row_and_differs_from_real_labels():
    net = unet(classes=10)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    none = net(x, t, None)
    torch.testing.assert_close(none, net(x, t, torch.tensor([10, 10])))
    assert not torch.allclose(none, net(x, t, torch.tensor([1, 2])))


def test_unconditional_unet_has_no_label_table():
    net = unet()
    assert net.label_emb is None
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2) + 0.1
    torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([0, 1])))


def test_dropout_runs_under_vmap_with_different_randomness():
    nets, params, buffers = _stacked(lambda seed: unet(seed=seed, dropout=0.5), n=2)
    x, t = torch.randn(2, 2, 1, 8, 8), torch.rand(2, 2) + 1e-3

    def call(p, b, xi, ti):
        return functional_call(nets[0], (p, b), (xi, ti))

    out = vmap(call, randomness="different")(params, buffers, x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_size": 30}, r"multiples of 4 .*8, 28, 32.*got 30x30"),
    ({"image_size": 28, "size": "paper"}, None),  # fine: the paper preset takes 28
    ({"image_size": 28, "base": 12}, "not a multiple of groups=8"),
    ({"image_size": 28, "attn_resolutions": (16,)}, r"visits .* \[28, 14, 7\]"),
    ({"image_size": 28, "num_downsamples": 3}, r"\[0, 2\]"),
    ({"image_size": 28, "size": "huge"}, "tiny"),
])
def test_bad_unet_settings_are_one_clear_error(kwargs, match):
    kwargs = {"size": "tiny", "in_channels": 1, **kwargs}
    if match is None:
        with torch.device("meta"):
            build_model("unet", **kwargs)
        return
    with pytest.raises(FedscoreError, match=match):
        build_model("unet", **kwargs)


def test_an_input_the_unet_cannot_take_is_a_clear_error_at_the_call():
    net = unet(size=8)
    with pytest.raises(FedscoreError, match=r"input images.*30 -> 15 -> 7.5"):
        net(torch.randn(1, 1, 30, 30), torch.rand(1))
    with pytest.raises(FedscoreError, match=r"\(B, C, H, W\)"):
        net(torch.randn(1, 64), torch.rand(1))
