"""Pretrained in (issue 18, item 4): a local diffusers U-Net folder is theta_0 of the model a
config names, and a folder that cannot be that model is one clear error."""

import sys

import pytest
import torch

import diffusers_folders
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.federated.setup import model_setup
from fedscore.models import (
    build_model,
    build_model_for,
    check_pretrained,
    load_trained,
    save_weights,
)

diffusers = pytest.importorskip("diffusers")

TINY = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}


def saved_unet(folder, **kw):
    return diffusers_folders.saved_unet(folder, blocks=TINY, **kw)


def model_cfg(path, **model):
    return load_config(None, data={"name": "digits"},
                       model={"kind": "diffusers-unet", "pretrained": str(path), **model}).model


@pytest.mark.parametrize("pipeline", [False, True], ids=["unet-folder", "pipeline-folder"])
def test_the_pretrained_weights_are_theta_0_whatever_the_seed(tmp_path, pipeline):
    unet = saved_unet(tmp_path / "pre", pipeline=pipeline)
    cfg = model_cfg(tmp_path / "pre")
    a, b = build_model_for(cfg, (1, 8, 8), 10, seed=0), build_model_for(cfg, (1, 8, 8), 10, seed=5)
    for k, v in unet.state_dict().items():
        assert torch.equal(a.unet.state_dict()[k], v) and torch.equal(b.unet.state_dict()[k], v)
    assert a.time_map == "ddpm"  # a pretrained DDPM knows DDPM timesteps
    assert build_model_for(model_cfg(tmp_path / "pre", options={"time_map": "log"}),
                           (1, 8, 8), 10).time_map == "log"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t), unet(x, a.timestep(t)).sample)


def test_a_federation_starts_from_the_pretrained_weights(tmp_path):
    unet = saved_unet(tmp_path / "pre")
    cfg = load_config(None, data={"name": "digits"}, federation={"workers": 2, "rounds": 1},
                      model={"kind": "diffusers-unet", "pretrained": str(tmp_path / "pre")})
    init = model_setup(cfg).init_params
    for k, v in unet.named_parameters():
        assert torch.equal(init[f"unet.{k}"], v.detach())


def test_a_conditional_pretrained_unet_and_its_label_table(tmp_path):
    saved_unet(tmp_path / "pre", num_class_embeds=11)
    net = build_model_for(model_cfg(tmp_path / "pre", conditional=True), (1, 8, 8), 10)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 2.0])
    assert not torch.allclose(net(x, t, torch.tensor([0, 1])), net(x, t))
    with pytest.raises(FedscoreError, match=r"num_class_embeds=11.*num_classes: 10"):
        build_model_for(model_cfg(tmp_path / "pre", conditional=True), (1, 8, 8), 4)
    with pytest.raises(FedscoreError, match="model.conditional: true and model.num_classes: 10"):
        build_model_for(model_cfg(tmp_path / "pre"), (1, 8, 8), 10)


def test_loading_a_trained_run_reads_the_architecture_not_the_pretrained_weights(tmp_path):
    saved_unet(tmp_path / "pre")
    cfg = model_cfg(tmp_path / "pre")
    trained = build_model_for(cfg, (1, 8, 8), 10)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    save_weights(dict(trained.named_parameters()), tmp_path / "model.safetensors")
    (tmp_path / "pre" / "diffusion_pytorch_model.safetensors").unlink()  # never read
    loaded = load_trained(cfg, tmp_path / "model.safetensors", (1, 8, 8), 10)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def write_vae(folder):
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=1,
                            in_channels=1, out_channels=1).save_pretrained(folder)


@pytest.mark.parametrize(("setup", "model", "shape", "match"), [
    (None, {}, (1, 8, 8), "does not exist"),
    (lambda d: d.mkdir(), {}, (1, 8, 8), "neither config.json nor unet/config.json"),
    (write_vae, {}, (1, 8, 8), "holds a model of class AutoencoderKL"),
    (saved_unet, {}, (3, 8, 8), "in_channels=1 but the data have 3 channel"),
    (saved_unet, {}, (1, 16, 16), "sample_size=8 but the images are 16x16"),
    (saved_unet, {"kind": "unet"}, (1, 8, 8), "only model.kind diffusers-unet"),
    (saved_unet, {"options": {"block_out_channels": [8, 8]}}, (1, 8, 8),
     "only the adapter options"),
    (lambda d: (saved_unet(d), (d / "diffusion_pytorch_model.safetensors").write_bytes(b"x")),
     {}, (1, 8, 8), "cannot load the pretrained UNet2DModel"),
], ids=["missing", "empty", "vae", "channels", "size", "kind", "options", "corrupt-weights"])
def test_a_folder_that_cannot_be_the_model_is_one_clear_error(tmp_path, setup, model, shape,
                                                              match):
    folder = tmp_path / "pre"
    if setup is not None:
        setup(folder)
    cfg = model_cfg(folder, **model)
    with pytest.raises(FedscoreError, match=match):
        build_model_for(cfg, shape, 10)
    if match != "cannot load the pretrained UNet2DModel":  # that one needs the weights
        with pytest.raises(FedscoreError, match=match):
            check_pretrained(cfg, shape, 10)


@pytest.mark.parametrize(("build", "what"), [
    (lambda: build_model("diffusers-unet", in_channels=1, image_size=8, **TINY),
     "model.kind diffusers-unet"),
    (lambda: build_model("fi-paper", in_channels=1, image_size=8), "model.kind fi-paper"),
], ids=["diffusers-unet", "fi-paper"])
def test_without_diffusers_the_diffusers_kinds_name_the_extra(monkeypatch, build, what):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` fails
    with pytest.raises(FedscoreError, match=rf"{what} needs .*fedscore\[diffusers\]"):
        build()
