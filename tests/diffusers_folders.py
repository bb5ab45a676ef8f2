"""Small random diffusers U-Nets saved as the folders users bring (a bare unet folder, or a
DDPMPipeline folder with unet/): what the pretrained-in, FI-agent and Flower tests load.
Imported by those tests (tests/ is on sys.path: pytest inserts the root conftest's folder);
each skips when diffusers is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PLAIN = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
         "down_block_types": ("DownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "UpBlock2D")}
"""Two resolutions, no attention: the smallest U-Net the agents' tests need."""


def saved_unet(folder: Path, *, blocks: dict = PLAIN, pipeline: bool = False, seed: int = 0,
               counts: list[int] | None = None, **config):
    """A random UNet2DModel (8x8 grey unless `config` says otherwise) saved in `folder` as a
    bare unet folder, or as a DDPMPipeline folder (folder/unet); `counts`: a
    class_counts.json beside it, as an export writes. Returns the U-Net."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{"sample_size": 8, "in_channels": 1, "out_channels": 1,
                                    **blocks, **config})
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(
            folder)
    else:
        unet.save_pretrained(folder)
    if counts is not None:
        (Path(folder) / "class_counts.json").write_text(json.dumps({"class_counts": counts}))
    return unet
