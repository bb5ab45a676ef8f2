"""diffusers U-Nets plug in as score networks (our contract net(x, t, y=None)) and run
under vmap like ours; the FI paper's Appendix B network is one preset."""

import math

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from fedscore.errors import FedscoreError
from fedscore.models import build_model, count_params

TINY = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}
TINY_COND = {"architecture": "UNet2DConditionModel", "block_out_channels": (16, 32),
             "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 10,
             "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def tiny(seed=0, config=TINY, **kw):
    torch.manual_seed(seed)
    return build_model("diffusers-unet", in_channels=1, image_size=8, num_classes=10,
                       **config, **kw)


@pytest.mark.parametrize("config", [TINY, TINY_COND], ids=["UNet2DModel", "Condition"])
def test_a_diffusers_unet_keeps_the_shape_and_reads_labels(config):
    net = tiny(config=config)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1e-3, 0.5, 5.0])
    labelled, unlabelled = net(x, t, torch.tensor([0, 1, 2])), net(x, t)
    assert labelled.shape == x.shape and not torch.allclose(labelled, unlabelled)
    processors = [type(m.processor).__name__ for m in net.unet.modules()
                  if hasattr(m, "set_processor")]
    assert processors and set(processors) == {"AttnProcessor"}  # plain: vmaps on CPU


@pytest.mark.parametrize(("config", "time_map"), [(TINY, "ddpm"), (TINY_COND, "log")],
                         ids=["UNet2DModel", "Condition"])
def test_stacked_diffusers_unets_under_vmap_equal_separate_calls(config, time_map):
    nets = [tiny(seed=i, config=config, time_map=time_map) for i in range(3)]
    params, buffers = stack_module_state(nets)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 1, 8, 8, generator=g), torch.rand(3, 2, generator=g) + 1e-3
    y = torch.randint(0, 10, (3, 2), generator=g)

    def call(p, b, xi, ti, yi):
        return functional_call(nets[0], (p, b), (xi, ti, yi))

    per_copy = vmap(call)(params, buffers, x, t, y)
    shared = vmap(call, in_dims=(0, 0, None, None, None))(params, buffers, x[0], t[0], y[0])
    for i, net in enumerate(nets):
        torch.testing.assert_close(per_copy[i], net(x[i], t[i], y[i]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared[i], net(x[0], t[0], y[0]), atol=1e-5, rtol=1e-4)


def test_time_maps_send_forward_times_to_the_documented_timesteps():
    t = torch.tensor([1e-3, 0.5, 5.0])
    linear = tiny(T=5.0).timestep(t)
    torch.testing.assert_close(linear, t * 200.0)
    log = tiny(T=5.0, time_map="log", delta=1e-3).timestep(t)
    expected = (t.log() - math.log(1e-3)) * 1000 / (math.log(5.0) - math.log(1e-3))
    torch.testing.assert_close(log, expected)
    # DDPM index: alpha_bar_k = e^{-2t}; alpha_bar_0 = 1 - 1e-4 -> t_0 = -0.5 log(1 - 1e-4)
    ddpm = tiny(time_map="ddpm")
    t0 = -0.5 * math.log(1 - 1e-4)
    t1 = -0.5 * math.log((1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)))
    got = ddpm.timestep(torch.tensor([t0, (t0 + t1) / 2, 1e-7, 50.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5, 0.0, 999.0], dtype=torch.float64))


def test_fi_paper_preset_is_the_appendix_b_network():
    with torch.device("meta"):
        net = build_model("fi-paper", in_channels=1, image_size=28, num_classes=10)
    cfg = net.unet.config
    assert tuple(cfg.block_out_channels) == (32, 480, 576, 576)
    assert cfg.cross_attention_dim == 10 and cfg.layers_per_block == 2
    assert tuple(cfg.down_block_types)[2] == "CrossAttnDownBlock2D"
    assert cfg.sample_size == 28 and cfg.in_channels == cfg.out_channels == 1
    assert 150_000_000 < count_params(net) < 180_000_000


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_size": 7}, r"multiples of 2; got 7"),
    ({"foo": 1}, "unexpected keyword argument 'foo'"),
    ({"num_class_embeds": 10}, r"num_class_embeds = num_classes \+ 1"),
    ({"time_map": "cosine"}, "choose one of: ddpm, linear, log"),
])
def test_bad_diffusers_settings_are_clear_errors(kwargs, match):
    with pytest.raises(FedscoreError, match=match):
        torch.manual_seed(0)
        build_model("diffusers-unet", **{"in_channels": 1, "image_size": 8,
                                         "num_classes": 10, **TINY, **kwargs})


def test_one_hot_labels_must_fit_the_token_width():
    with pytest.raises(FedscoreError, match="label_encoding='learned'"):
        tiny(config=TINY_COND | {"cross_attention_dim": 4})
    net = tiny(config=TINY_COND | {"cross_attention_dim": 4}, label_encoding="learned")
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.rand(2) + 0.1, torch.tensor([3, 9])).shape == x.shape
