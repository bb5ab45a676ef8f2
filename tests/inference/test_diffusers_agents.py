"""FI agents from diffusers folders (issue 18, item 6): pipeline and bare unet folders are
agents beside run folders, as long as all share one architecture."""

import json
import logging

import numpy as np
import pytest
import torch

from diffusers_folders import PLAIN, saved_unet
from fedscore.config import dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import load_agents, sample_agents
from fedscore.experiments.diffusers_agents import agent_config, is_diffusers_folder
from fedscore.export import export_diffusers
from fedscore.models import build_model_for, save_weights

diffusers = pytest.importorskip("diffusers")

TINY = PLAIN


def bare_unet(folder, seed, **kw):
    """A random 8x8 grey UNet2DModel saved as a unet folder (or a DDPMPipeline folder)."""
    saved_unet(folder, seed=seed, **kw)
    return folder


def run_folder(tmp_path, name, seed, counts):
    """A conditional diffusers-unet agent's run folder (config.yaml, model.safetensors,
    class_counts.json) on the bundled 8x8 `digits`, as `fedscore agents train` leaves it."""
    cfg = load_config(None, name=name, out_dir=str(tmp_path), data={"name": "digits"},
                      model={"kind": "diffusers-unet", "conditional": True,
                             "options": {**TINY, "time_map": "ddpm"}},
                      diffusion={"grid": "ddpm-linear", "T": None, "delta": None},
                      sample={"grid": "ddpm-linear"}, seed=seed)
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    model = build_model_for(cfg.model, (1, 8, 8), 10, seed=seed)
    save_weights(dict(model.named_parameters()), run / "model.safetensors")
    (run / "class_counts.json").write_text(json.dumps({"class_counts": counts}))
    return run


def test_two_bare_unet_folders_are_unconditional_agents(tmp_path, caplog):
    dirs = [bare_unet(tmp_path / f"u{i}", seed=i) for i in range(2)]
    assert all(is_diffusers_folder(d) for d in dirs)
    cfg = agent_config(dirs[0])
    assert (cfg.model.kind, cfg.model.pretrained, cfg.model.conditional) == (
        "diffusers-unet", str(dirs[0]), False)
    assert (cfg.data.image_size, cfg.data.channels, cfg.diffusion.grid) == (8, 1, "ddpm-linear")
    with caplog.at_level(logging.WARNING):
        agents = load_agents(dirs)
    assert "uniform" in caplog.text and agents.counts.tolist() == [[1], [1]]
    for aggregator in ("mean", "mixture", "route"):
        paths = sample_agents(dirs, tmp_path / aggregator, aggregator=aggregator, per_label=3,
                              steps=4, progress=False)
        with np.load(paths["samples"]) as npz:
            assert npz["samples"].shape == (3, 1, 8, 8) and "labels" not in npz.files
            assert np.isfinite(npz["samples"]).all()
        assert paths["figure"].is_file()
    for aggregator in ("weighted", "hybrid"):
        with pytest.raises(FedscoreError, match="unconditional"):
            sample_agents(dirs, tmp_path / aggregator, aggregator=aggregator, per_label=3,
                          steps=4, progress=False)


def test_two_pipeline_folders_are_conditional_agents_with_their_counts(tmp_path):
    dirs = [bare_unet(tmp_path / f"p{i}", seed=i, pipeline=True, num_class_embeds=11,
                      counts=[5] * 5 + [0] * 5 if i == 0 else [0] * 5 + [5] * 5)
            for i in range(2)]
    agents = load_agents(dirs)
    assert agents.config.model.num_classes == 10 and agents.config.model.conditional
    assert agents.counts.sum(1).tolist() == [25, 25]
    paths = sample_agents(dirs, tmp_path / "out", aggregator="weighted", per_label=2, steps=3,
                          progress=False)
    with np.load(paths["samples"]) as npz:
        assert npz["samples"].shape == (20, 1, 8, 8)
        assert npz["labels"].tolist() == [c for c in range(10) for _ in range(2)]


def test_a_run_folder_and_its_export_are_the_same_agent(tmp_path):
    counts = list(range(1, 11))
    run = run_folder(tmp_path, "agent-00", seed=0, counts=counts)
    exported = export_diffusers(run, tmp_path / "exported")
    agents = load_agents([run, exported, run_folder(tmp_path, "agent-01", seed=1,
                                                    counts=counts[::-1])])
    assert agents.counts.tolist() == [counts, counts, counts[::-1]]  # copied by the export
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.3, 1.0, 4.0]), torch.arange(4)
    scores = agents(x, t, y)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(scores[0], scores[2])
    paths = sample_agents([run, exported], tmp_path / "mixed", aggregator="mixture",
                          per_label=1, steps=3, progress=False)
    with np.load(paths["samples"]) as npz:
        assert npz["samples"].shape == (10, 1, 8, 8)


@pytest.mark.parametrize(("other", "match"), [
    ({"block_out_channels": (8, 16)}, "another architecture"),
    ({"sample_size": 16}, "item shape"),
    ({"num_class_embeds": 11}, "labels"),
], ids=["widths", "size", "labels"])
def test_agents_of_different_architectures_are_refused(tmp_path, other, match):
    first = bare_unet(tmp_path / "a", seed=0)
    second = bare_unet(tmp_path / "b", seed=1, **other)
    with pytest.raises(FedscoreError, match=match):
        load_agents([first, second])
    with pytest.raises(FedscoreError, match=match):
        sample_agents([first, second], tmp_path / "out", per_label=1, steps=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_conditional_run_folder_and_an_unconditional_unet_are_refused(tmp_path):
    run = run_folder(tmp_path, "agent-00", seed=0, counts=[1] * 10)
    with pytest.raises(FedscoreError, match="labels"):
        load_agents([run, bare_unet(tmp_path / "u", seed=0)])


def test_a_folder_that_is_no_model_is_one_clear_error(tmp_path):
    vae = tmp_path / "vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=1,
                            in_channels=1, out_channels=1).save_pretrained(vae)
    with pytest.raises(FedscoreError, match="AutoencoderKL"):
        load_agents([vae])
