"""Export out (issue 18, item 5): a run's U-Net as a diffusers DDPMPipeline folder that
samples exactly as fedscore's ancestral sampler does on the same noise, and every model
the pipeline could not run exactly is refused with nothing written."""

import json

import numpy as np
import pytest
import torch

from fedscore import diffusion
from fedscore.config import dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.export import FORMATS, ddpm_times, export_diffusers, export_run
from fedscore.models import build_model_for, save_weights
from fedscore.runs.evaluate import load_model

diffusers = pytest.importorskip("diffusers")

TINY = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"], "time_map": "ddpm"}
TINY_COND = {"architecture": "UNet2DConditionModel", "block_out_channels": [16, 32],
             "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 10,
             "attention_head_dim": 8, "time_map": "ddpm",
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


def write_run(tmp_path, name, *, kind="diffusers-unet", options=TINY, conditional=False,
              parameterisation="eps", counts=None, seed=0):
    """A run folder as `fedscore train` leaves it (config.yaml + model.safetensors) with a
    randomly initialised 8x8 grey model for the bundled `digits` data."""
    cfg = load_config(None, name=name, out_dir=str(tmp_path), data={"name": "digits"},
                      model={"kind": kind, "conditional": conditional, "options": options},
                      diffusion={"grid": "ddpm-linear", "steps": 20, "T": None,
                                 "delta": None, "parameterisation": parameterisation},
                      seed=seed)
    model = build_model_for(cfg.model, (1, 8, 8), 10, seed=seed)
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_weights(dict(model.named_parameters()), run / "model.safetensors")
    if counts is not None:
        (run / "class_counts.json").write_text(json.dumps({"class_counts": counts}))
    return run


def fedscore_images(net, batch, seed, timesteps):
    """fedscore's ancestral sampler on the DDPM grid, clipped like DDPM, as the pipeline's
    output_type="np" images."""
    score = diffusion.clip_denoised(diffusion.score_fn_of(lambda x, t: net(x, t), "eps"))
    g = torch.Generator().manual_seed(seed)
    x = diffusion.sample(score, diffusion.prior((batch, 1, 8, 8), g), ddpm_times(timesteps),
                         "ancestral", g)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = write_run(tmp, "uncond", counts=[3] * 10)
    return run, export_diffusers(run, tmp / "pipe")


@pytest.mark.parametrize("steps", [10, 50, pytest.param(1000, marks=pytest.mark.slow)])
def test_the_exported_pipeline_samples_the_same_images_as_fedscore(exported, steps):
    run, out = exported
    pipe = diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(7),
                  num_inference_steps=steps, output_type="np").images
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
    pipe.scheduler.set_timesteps(steps)
    net, _ = load_model(run)
    ours = fedscore_images(net, 3, 7, pipe.scheduler.timesteps)
    np.testing.assert_allclose(images, ours, atol=1e-4)
    assert images.std() > 0.01  # not a constant image: the comparison means something


def test_the_export_folder_holds_the_pipeline_and_what_fedscore_knew(exported):
    run, out = exported
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "model_index.json",
                                               "fedscore_export.json", "class_counts.json"}
    meta = json.loads((out / "fedscore_export.json").read_text())
    assert meta["time_map"] == "ddpm" and meta["parameterisation"] == "eps"
    assert meta["run"] == "uncond" and meta["labels"]["conditional"] is False
    assert meta["config"]["model"]["kind"] == "diffusers-unet"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]) == (
        1e-4, 0.02, 1000)
    assert sched["prediction_type"] == "epsilon" and sched["clip_sample"] is True


def test_a_conditional_export_reads_class_labels_like_the_run(tmp_path):
    run = write_run(tmp_path, "cond", conditional=True)
    out = export_run(run, tmp_path / "pipe", "diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)
    net, _ = load_model(run)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 0.2, 3.0, 0.01]), torch.arange(4)
    with torch.no_grad():
        theirs = pipe.unet(x, net.timestep(t), class_labels=y).sample
        null = pipe.unet(x, net.timestep(t), class_labels=torch.full((4,), 10)).sample
        torch.testing.assert_close(theirs, net(x, t, y), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(null, net(x, t), atol=1e-5, rtol=1e-4)
    labels = json.loads((out / "fedscore_export.json").read_text())["labels"]
    assert labels == {"conditional": True, "num_classes": 10, "argument": "class_labels",
                      "encoding": "integer labels 0..9; 10 is the null label (no label)"}


@pytest.mark.parametrize(("kind", "options", "parameterisation", "match"), [
    ("diffusers-unet", {**TINY, "time_map": "linear"}, "eps", "time_map: ddpm"),
    ("diffusers-unet", TINY, "score", "parameterisation: eps"),
    ("diffusers-unet", {**TINY_COND, "label_encoding": "learned"}, "eps", "label_encoding"),
    ("mlp", {"hidden": 8, "depth": 1}, "eps", "model.kind diffusers-unet"),
    ("unet", {}, "eps", "model.kind diffusers-unet"),
], ids=["linear-time", "score", "learned-labels", "mlp", "unet"])
def test_models_the_pipeline_cannot_run_exactly_are_refused(tmp_path, kind, options,
                                                            parameterisation, match):
    cfg = load_config(None, name="r", out_dir=str(tmp_path), data={"name": "digits"},
                      model={"kind": kind, "conditional": True, "options": options},
                      diffusion={"parameterisation": parameterisation})
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    with pytest.raises(FedscoreError, match=match):
        export_diffusers(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left


def test_an_existing_folder_is_replaced_only_with_overwrite(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FedscoreError, match="--overwrite"):
        export_diffusers(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_diffusers(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    with pytest.raises(FedscoreError, match="run folder itself"):
        export_diffusers(run, run, overwrite=True)


def test_a_non_finite_model_and_an_unknown_format_are_refused(tmp_path):
    run = write_run(tmp_path, "nan")
    from safetensors.torch import load_file, save_file
    weights = load_file(str(run / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(FedscoreError, match="non-finite"):
        export_diffusers(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert FORMATS == ("diffusers",)
    with pytest.raises(FedscoreError, match="export format"):
        export_run(run, tmp_path / "out", fmt="onnx")
