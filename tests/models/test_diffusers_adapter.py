"""diffusers U-Nets plug in as score networks and run under vmap like ours."""

import torch
from torch.func import functional_call, stack_module_state, vmap

from fedscore.models import build_model, count_params

TINY = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D")}


def tiny(seed):
    torch.manual_seed(seed)
    return build_model("diffusers-unet", in_channels=1, image_size=8, num_classes=10, **TINY)


def test_a_diffusers_unet_keeps_the_shape_and_takes_labels():
    net = tiny(0)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3) + 1e-3
    a, b = net(x, t, torch.tensor([0, 1, 2])), net(x, t)
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_stacked_diffusers_unets_under_vmap_equal_separate_calls():
    nets = [tiny(i) for i in range(2)]
    params, buffers = stack_module_state(nets)
    x, t, y = torch.randn(2, 3, 1, 8, 8), torch.rand(2, 3) + 1e-3, torch.randint(0, 10, (2, 3))

    def call(p, b, xi, ti, yi):
        return functional_call(nets[0], (p, b), (xi, ti, yi))

    out = vmap(call)(params, buffers, x, t, y)
    for i, net in enumerate(nets):
        assert torch.allclose(out[i], net(x[i], t[i], y[i]), atol=1e-5)


def test_fi_paper_preset_is_the_appendix_b_network():
    with torch.device("meta"):
        net = build_model("fi-paper", in_channels=1, image_size=28, num_classes=10)
    cfg = net.unet.config
    assert tuple(cfg.block_out_channels) == (32, 480, 576, 576)
    assert cfg.cross_attention_dim == 10 and cfg.layers_per_block == 2
    assert count_params(net) > 10_000_000
