"""Diffusers folders as federated-inference agents (issue 18, item 6).

`fedscore agents sample` takes run folders or diffusers folders: a pipeline folder
(model_index.json + unet/, e.g. one `fedscore.export.export_diffusers` wrote) or a bare
UNet2DModel / UNet2DConditionModel folder. A diffusers folder has no config.yaml, so its
agent's RunConfig is synthesised (`agent_config`): model kind diffusers-unet with
pretrained=DIR and time map "ddpm" (a DDPM-trained U-Net knows DDPM timesteps), the
ddpm-linear grid with parameterisation eps (what DDPM trains), data "folder" with the
U-Net's sample_size and in_channels and no path (nothing is read: `data.shape_and_classes`
sizes the model from the config), and, for a class-conditional UNet2DModel, num_classes =
num_class_embeds - 1 (fedscore's label table has a null row last). A UNet2DConditionModel
is conditional only when the folder's fedscore_export.json says how many labels its
one-hot token carries. Its class counts are the folder's class_counts.json when present,
else uniform (a logged warning says so: weighted aggregators then weight such agents
equally).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedscore.config import RunConfig, load_config
from fedscore.data import shape_and_classes
from fedscore.errors import FedscoreError
from fedscore.inference.agents import COUNTS_FILE, read_class_counts
from fedscore.models.build import build_model_for
from fedscore.models.pretrained import PRETRAINED_TIME_MAP, read_unet_config

log = logging.getLogger(__name__)
EXPORT_FILE = "fedscore_export.json"  # fedscore.export.EXPORT_FILE (not imported: a cycle)
AGENT_NAME = "diffusers-agent"


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder without config.yaml (not a run folder) holding a diffusers pipeline
    (model_index.json + unet/config.json) or a bare unet (config.json)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return False
    return ((path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file()
            or (path / "config.json").is_file())


def _export_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _num_classes(config: dict, meta: dict) -> int | None:
    if config["_class_name"] == "UNet2DModel":
        embeds = config.get("num_class_embeds")
        return int(embeds) - 1 if embeds and embeds > 1 else None
    labels = meta.get("labels")
    return labels.get("num_classes") if isinstance(labels, dict) else None


def agent_config(path: str | Path) -> RunConfig:
    """The RunConfig of the agent in diffusers folder `path` (module docstring)."""
    path = Path(path)
    folder, config = read_unet_config(path)
    size, channels = config.get("sample_size"), config.get("in_channels", 3)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or channels not in (1, 3):
        raise FedscoreError(
            f"the U-Net in {str(folder)!r} has sample_size={size!r} and in_channels="
            f"{channels}; an agent samples square grey (1) or RGB (3) images"
        )
    classes = _num_classes(config, _export_meta(path))
    return load_config(
        None, name=AGENT_NAME,
        data={"name": "folder", "image_size": size, "channels": channels},
        model={"kind": "diffusers-unet", "pretrained": str(path),
               "conditional": classes is not None, "num_classes": classes,
               "options": {"time_map": PRETRAINED_TIME_MAP}},
        diffusion={"grid": "ddpm-linear", "T": None, "delta": None, "parameterisation": "eps"},
        sample={"grid": "ddpm-linear"},
    )


def agent_counts(path: str | Path, classes: int) -> list[int]:
    """The folder's class_counts.json, else one count per class (uniform; logged)."""
    path = Path(path)
    if (path / COUNTS_FILE).is_file():
        return read_class_counts(path)
    log.warning("%s has no %s: its class counts are taken as uniform (weighted aggregators "
                "weight it like an agent holding every class equally)", path, COUNTS_FILE)
    return [1] * classes


def load_diffusers_agent(path: str | Path):
    """(model in eval mode, synthesised RunConfig, class counts) of a diffusers folder."""
    cfg = agent_config(path)
    shape, classes = shape_and_classes(cfg)
    model = build_model_for(cfg.model, shape, classes)
    return model.eval(), cfg, agent_counts(path, classes)


def signature(model, cfg: RunConfig) -> dict:
    """What agents combined into one StackedAgents must share: item shape, labels,
    parameterisation, the adapter's time map (T and delta where the map reads them) and
    every parameter's shape. Agent 0's module evaluates all K, so these must agree."""
    shape, classes = shape_and_classes(cfg)
    out = {"item shape": tuple(shape), "labels": classes if cfg.model.conditional else None,
           "parameterisation": cfg.diffusion.parameterisation,
           "network": type(model).__name__}
    time_map = getattr(model, "time_map", None)
    if time_map is not None:
        out["time map"] = (time_map if time_map == "ddpm"
                           else (time_map, model.T, model.delta))
        out["label encoding"] = "learned" if getattr(model, "label_emb", None) else "one-hot"
    out["parameters"] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return out
