"""A local diffusers U-Net folder as theta_0: `model: {kind: diffusers-unet, pretrained: DIR}`.

DIR is a folder that `UNet2DModel.save_pretrained` / `UNet2DConditionModel.save_pretrained`
wrote (config.json + weights), or a pipeline folder holding one in DIR/unet/ (what
`DDPMPipeline.save_pretrained` and `fedscore.export.export_diffusers` write). Its weights
replace the seeded initial weights of `build_model_for`, and nothing else changes: the
federated engine's masks and eq. 8 act on the model's parameters whatever their start
(issue 18, item 4). Nothing is downloaded (`local_files_only=True`).

The time map defaults to "ddpm" for a pretrained U-Net: a network trained with diffusers'
DDPMScheduler knows DDPM timestep indices, and "ddpm" feeds it the index k with
alpha_bar_k = e^{-2t} (diffusers_adapter.TIME_MAPS); `model.options.time_map` overrides.

Every check reads config.json only (`check_pretrained`), so a caller can refuse a bad
folder before it writes anything; loading the weights is the last step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedscore.errors import FedscoreError, require
from fedscore.models.diffusers_adapter import DiffusersScoreNet

ARCHITECTURES = ("UNet2DModel", "UNet2DConditionModel")
ADAPTER_OPTIONS = ("T", "time_map", "delta", "label_encoding", "attn_processor")
PRETRAINED_TIME_MAP = "ddpm"


def import_diffusers(what: str = "model.kind diffusers-unet"):
    """diffusers, or the one FedscoreError naming the `diffusers` extra."""
    return require("diffusers", "diffusers", what)


def unet_dir(path: str | Path) -> Path:
    """The folder holding the U-Net's config.json: `path` itself, or `path/unet` for a
    pipeline folder. A missing folder, or one holding neither, is a FedscoreError."""
    path = Path(path)
    if not path.is_dir():
        raise FedscoreError(
            f"pretrained folder {str(path)!r} does not exist; model.pretrained names a local "
            "folder written by UNet2DModel.save_pretrained (or a pipeline's save_pretrained)"
        )
    for d in (path, path / "unet"):
        if (d / "config.json").is_file():
            return d
    raise FedscoreError(
        f"{str(path)!r} is not a diffusers model folder: it has neither config.json nor "
        "unet/config.json; save the U-Net with unet.save_pretrained(DIR) or the pipeline "
        "with pipeline.save_pretrained(DIR)"
    )


def read_unet_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the U-Net's folder, its config.json) for a unet or pipeline folder `path`; a config
    that is unreadable or of another architecture (a VAE, a transformer) is refused."""
    folder = unet_dir(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise FedscoreError(f"cannot read {str(folder / 'config.json')!r}: {err}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in ARCHITECTURES:
        raise FedscoreError(
            f"{str(folder)!r} holds a model of class {name or '(no _class_name)'} "
            f"(config.json's _class_name), not one of {', '.join(ARCHITECTURES)}: "
            "model.kind diffusers-unet fine-tunes an image-space diffusers U-Net"
        )
    return folder, config


def _side(sample_size) -> tuple[int, int] | None:
    if sample_size is None:
        return None
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


def check_unet_config(config: dict[str, Any], folder: Path, sample_shape: tuple[int, ...],
                      num_classes: int | None) -> None:
    """The U-Net of `config` fits items of `sample_shape` (C, H, W) and `num_classes` labels
    (None: unconditional); one FedscoreError naming the mismatch and its fix otherwise."""
    where = repr(str(folder))
    if len(sample_shape) != 3:
        raise FedscoreError(f"the pretrained U-Net in {where} takes images (C, H, W); the data "
                            f"have shape {tuple(sample_shape)}")
    c, h, w = sample_shape
    for key in ("in_channels", "out_channels"):
        if config.get(key, 3) != c:  # 3: diffusers' default for both
            raise FedscoreError(
                f"the pretrained U-Net in {where} has {key}={config.get(key, 3)} but the data "
                f"have {c} channel(s); set data.channels: {config.get(key, 3)} (own data) or "
                "pick a U-Net made for this data"
            )
    side = _side(config.get("sample_size"))
    if side is not None and side != (h, w):
        raise FedscoreError(
            f"the pretrained U-Net in {where} has sample_size={config.get('sample_size')} but "
            f"the images are {h}x{w}; set data.image_size: {side[0]} (own data) or pick a "
            "U-Net made for this size"
        )
    if config["_class_name"] == "UNet2DModel":
        have = config.get("num_class_embeds")
        want = num_classes + 1 if num_classes else None
        if have != want:
            fix = (f"set model.conditional: true and model.num_classes: {have - 1}" if have
                   else "set model.conditional: false (this U-Net has no label table)")
            raise FedscoreError(
                f"UNet2DModel label table mismatch: the pretrained U-Net in {where} has "
                f"num_class_embeds={have} but the config asks for num_classes={num_classes} "
                f"(fedscore's table has num_classes + 1 rows, the last the null label); {fix}"
            )


def _check_options(options: dict[str, Any], folder: Path) -> None:
    extra = sorted(set(options) - set(ADAPTER_OPTIONS))
    if extra:
        raise FedscoreError(
            f"model.options {extra} would change the architecture, which the pretrained "
            f"folder {str(folder)!r} fixes; with model.pretrained only the adapter options "
            f"{', '.join(ADAPTER_OPTIONS)} may be set"
        )


def check_pretrained(cfg, sample_shape: tuple[int, ...], num_classes: int | None) -> None:
    """Every check of a model config with `pretrained` (reads config.json, no weights):
    the kind, the folder, the architecture, channels, size, label table and options.
    `num_classes` is the data's (used when cfg.conditional). Call it before writing a run
    folder; `build_model_for` calls it too."""
    path = getattr(cfg, "pretrained", None)
    if path is None:
        return
    if cfg.kind != "diffusers-unet":
        raise FedscoreError(
            f"model.pretrained loads a diffusers U-Net folder, which only model.kind "
            f"diffusers-unet takes (got kind {cfg.kind!r}); set kind: diffusers-unet or "
            "remove pretrained"
        )
    folder, config = read_unet_config(path)
    _check_options(dict(cfg.options), folder)
    check_unet_config(config, folder, tuple(sample_shape),
                      num_classes if cfg.conditional else None)


def load_unet(path: str | Path, *, weights: bool = True) -> torch.nn.Module:
    """The diffusers U-Net of a unet or pipeline folder, in float32 and training mode (as a
    freshly built one); weights=False: its architecture only (from config.json), for a
    caller that loads trained weights next (`build.load_trained`)."""
    diffusers = import_diffusers()
    folder, config = read_unet_config(path)
    cls = getattr(diffusers, config["_class_name"])
    try:
        unet = (cls.from_pretrained(str(folder), local_files_only=True) if weights
                else cls.from_config(config))
    except Exception as err:  # diffusers' errors for missing or corrupt weight files
        raise FedscoreError(
            f"cannot load the pretrained {config['_class_name']} from {str(folder)!r}: "
            f"{type(err).__name__}: {err}"
        ) from None
    return unet.to(torch.float32).train()


def pretrained_model(cfg, sample_shape: tuple[int, ...], num_classes: int | None, *,
                     weights: bool = True) -> DiffusersScoreNet:
    """The pretrained U-Net of `cfg.pretrained` wrapped as a fedscore score network (its
    weights are theta_0); time_map "ddpm" unless cfg.options sets one."""
    check_pretrained(cfg, sample_shape, num_classes)
    options = {"time_map": PRETRAINED_TIME_MAP, **cfg.options}
    unet = load_unet(cfg.pretrained, weights=weights)
    return DiffusersScoreNet(unet, num_classes=num_classes if cfg.conditional else None,
                             **options)
