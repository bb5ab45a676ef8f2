"""Issue 18 on real Flower processes: two SuperNodes, each training on an image folder only
it reads (node config `data-path`), one of them lacking the highest class; the server reads
no data and sizes the model from the run config. Every process is stopped by its PID."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fedscore.config import load_config
from fedscore.federated.setup import model_setup
from fedscore.flower.launch import LocalFlowerCluster
from fedscore.flower.run import server_settings
from run_records import records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def silo(root, classes, seed):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_supernodes_train_on_their_own_folders(tmp_path):
    folders = {0: silo(tmp_path / "hospital-a", ["0", "1", "2"], seed=0),
               1: silo(tmp_path / "hospital-b", ["0", "1"], seed=1)}  # no class 2 here
    cfg = load_config(
        name="silos", out_dir=str(tmp_path / "unused"), seed=1,
        data={"name": "folder", "image_size": 16, "channels": 1},  # no path: nodes hold it
        model={"kind": "unet", "size": "tiny", "conditional": True, "num_classes": 3},
        diffusion={"steps": 10},
        federation={"workers": 2, "rounds": 2, "local_steps": 2, "batch_size": 4,
                    "policy": "topk", "level": "M", "strategy": "sequential"})
    nodes = {n: {"data-path": str(p)} for n, p in folders.items()}
    out = tmp_path / "flower-silos"
    with LocalFlowerCluster(tmp_path / "home", nodes=2, node_config=nodes) as fed:
        fed.run_app(server_settings(cfg, out, round_timeout=300), timeout=600)
    rounds = records(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies"] == 2 and not r["degraded"] for r in rounds), rounds
    got = load_file(str(out / "model.safetensors"))
    theta0 = model_setup(cfg).init_params  # the server's model, sized by the config
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in theta0.items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert any(not torch.equal(got[k], theta0[k]) for k in got)  # it trained
