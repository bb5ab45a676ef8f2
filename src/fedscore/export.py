"""A trained run as a diffusers pipeline folder: `fedscore export RUN_DIR --format diffusers`.

`export_diffusers` writes what `diffusers.DDPMPipeline.from_pretrained(OUT)` loads: unet/
(the run's trained U-Net, its EMA weights when the run kept them), scheduler/ (DDPM's
linear betas) and model_index.json, plus fedscore_export.json (the run, its config, the
time map and what the U-Net expects for labels) and the run's class_counts.json if any.

Exactness (issue 18, item 5). fedscore trains eps(x, t) on the OU process with
alpha_bar_t = e^{-2t}; diffusers' DDPMScheduler calls the U-Net at integer timestep k with
alpha_bar_k = prod_{j<=k} (1 - beta_j), betas linear 1e-4 .. 0.02 over 1000 steps. A model
trained with time_map "ddpm" already feeds its U-Net that k at t_k = -0.5 log alpha_bar_k
(diffusers_adapter.TIME_MAPS), and with parameterisation "eps" its output is DDPM's
epsilon; so the exported pipeline's DDPM steps are fedscore's ancestral steps on the grid
t_k (then to t = 0) with the Tweedie estimate clipped to [-1, 1], the same images for the
same noise (tests/models/test_export_diffusers.py). Any other time map ("linear", "log")
or the "score" parameterisation would need a U-Net that DDPM does not call, so those runs
are refused, as are learned label tables (they live outside the U-Net) and non-diffusers
kinds. The folder is written into a temporary folder beside OUT and renamed into place:
a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedscore.diffusion.grids import ddpm_betas
from fedscore.errors import FedscoreError, unknown
from fedscore.inference.agents import COUNTS_FILE
from fedscore.models.pretrained import PRETRAINED_TIME_MAP, import_diffusers
from fedscore.runs.evaluate import load_model, read_config
from fedscore.runs.folder import versions

FORMATS = ("diffusers",)
EXPORT_FILE = "fedscore_export.json"
KINDS = ("diffusers-unet", "fi-paper")
DDPM_SCHEDULER = {  # what DDPM (Ho et al. 2020) trains with and fedscore's "ddpm" map assumes
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",  # beta-tilde: fedscore's ancestral_step's variance
    "clip_sample": True,  # x0-hat clipped to [-1, 1]: diffusion.clip_denoised
    "clip_sample_range": 1.0,
}


def time_map_of(cfg) -> str:
    """The diffusers time map a run's model uses: model.options.time_map, else "ddpm" for a
    pretrained U-Net and "linear" otherwise (the adapter's defaults)."""
    default = PRETRAINED_TIME_MAP if cfg.model.pretrained is not None else "linear"
    return str(cfg.model.options.get("time_map", default))


def check_exportable(cfg) -> None:
    """One FedscoreError naming the setting to train with when the run's model cannot be
    written as a DDPM pipeline that samples exactly as fedscore does (module docstring)."""
    if cfg.model.kind not in KINDS:
        raise FedscoreError(
            f"export --format diffusers writes a diffusers U-Net; this run's model.kind is "
            f"{cfg.model.kind!r}: train with model.kind diffusers-unet (or fi-paper)"
        )
    if time_map_of(cfg) != "ddpm":
        raise FedscoreError(
            f"this run's U-Net reads time by the {time_map_of(cfg)!r} time map, which DDPM's "
            "integer timesteps cannot express; train with model.options.time_map: ddpm (the "
            "U-Net then sees DDPM timestep k exactly where alpha_bar_k = e^(-2t))"
        )
    if cfg.diffusion.parameterisation != "eps":
        raise FedscoreError(
            f"this run's network predicts the {cfg.diffusion.parameterisation!r}, but a DDPM "
            "pipeline reads its U-Net as epsilon; train with diffusion.parameterisation: eps"
        )
    if cfg.model.options.get("label_encoding") == "learned":
        raise FedscoreError(
            "this run's labels go through a learned label table that lives outside the "
            "diffusers U-Net, so the exported U-Net could not read labels; train with "
            "model.options.label_encoding: one-hot"
        )


def labels_spec(net) -> dict:
    """What the exported U-Net expects for labels (fedscore_export.json's `labels`)."""
    c = net.num_classes
    if not c:
        return {"conditional": False, "num_classes": None}
    if net.cross_attention:
        return {"conditional": True, "num_classes": c, "argument": "encoder_hidden_states",
                "encoding": f"the one-hot label as one token, shape (B, 1, {net.token_width}); "
                            "all zeros for no label"}
    return {"conditional": True, "num_classes": c, "argument": "class_labels",
            "encoding": f"integer labels 0..{c - 1}; {c} is the null label (no label)"}


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    if run_dir.resolve() == out.resolve() or out.resolve() in run_dir.resolve().parents:
        raise FedscoreError(f"--out {str(out)!r} would replace the run folder itself; choose "
                            "another folder")
    if out.exists() and not out.is_dir():
        raise FedscoreError(f"--out {str(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FedscoreError(f"--out {str(out)!r} is not empty; choose another folder or pass "
                            "--overwrite")


def _nonfinite(model: torch.nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is moved aside first and removed
    only once the new folder is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_diffusers(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     overwrite: bool = False) -> Path:
    """Write the trained model of `run_dir` as a diffusers DDPMPipeline folder `out_dir`
    (module docstring); returns `out_dir`. Refused, with nothing written: a model that the
    DDPM pipeline cannot run exactly (check_exportable), a non-finite model, a non-empty
    out_dir without overwrite."""
    run_dir, out = Path(run_dir), Path(out_dir)
    cfg = read_config(run_dir)
    check_exportable(cfg)
    _check_out(out, run_dir, overwrite)
    diffusers = import_diffusers("export --format diffusers")
    net, cfg = load_model(run_dir)
    bad = _nonfinite(net)
    if bad:
        raise FedscoreError(f"the model of {str(run_dir)!r} has non-finite weights ({bad[:3]}"
                            "...); export a run that trained without diverging")
    if getattr(net, "time_map", None) != "ddpm":  # the config and the built model agree
        raise FedscoreError(f"the model of {str(run_dir)!r} does not use the ddpm time map")
    scheduler = diffusers.DDPMScheduler(**DDPM_SCHEDULER)
    pipeline = diffusers.DDPMPipeline(unet=net.unet, scheduler=scheduler)
    meta = {
        "format": "diffusers", "versions": {**versions(), "diffusers": diffusers.__version__},
        "run": cfg.name, "run_dir": str(run_dir),
        "architecture": type(net.unet).__name__,
        "time_map": "ddpm",
        "timestep": "DDPM index k of t with alpha_bar_k = exp(-2 t) (OU time t = "
                    "-0.5 log alpha_bar_k)",
        "parameterisation": cfg.diffusion.parameterisation,
        "prediction_type": "epsilon",
        "weights": "EMA" if cfg.train.ema_decay is not None else "final",
        "labels": labels_spec(net),
        "scheduler": DDPM_SCHEDULER,
        "config": cfg.model_dump(mode="json"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipeline.save_pretrained(str(tmp))
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
        if (run_dir / COUNTS_FILE).is_file():
            shutil.copyfile(run_dir / COUNTS_FILE, tmp / COUNTS_FILE)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               fmt: str = "diffusers", overwrite: bool = False) -> Path:
    """`fedscore export RUN_DIR --format FMT --out OUT_DIR` (FMT one of FORMATS)."""
    if fmt not in FORMATS:
        raise unknown("export format", fmt, FORMATS)
    return export_diffusers(run_dir, out_dir, overwrite=overwrite)


def ddpm_times(timesteps) -> torch.Tensor:
    """fedscore's forward-time grid of a DDPMScheduler's `timesteps` (descending DDPM
    indices): t_k = -0.5 log alpha_bar_k for each, then 0 (DDPM's last step goes to x_0),
    float64 — the grid on which fedscore's ancestral sampler repeats the pipeline."""
    table = -0.5 * torch.log(torch.cumprod(1.0 - ddpm_betas(DDPM_SCHEDULER[
        "num_train_timesteps"]), 0))
    idx = torch.as_tensor(timesteps, dtype=torch.long)
    return torch.cat([table[idx], table.new_zeros(1)])

