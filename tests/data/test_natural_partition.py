"""Partition "natural" (issue 18 item 3): the silos the data give — a folder level or an .npz
`group` array — one per worker, in sorted order; the federated setup, the evaluation's
per-silo statistics and a whole `fedscore train` run use them."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fedscore import data
from fedscore.cli import app
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.federated.setup import prepare, worker_parts
from fedscore.runs.evaluate import silo_parts
from run_records import records


def write_silos(root, layout, size=16, seed=0):
    """root/<silo>/<class>/<i>.png for layout {silo: {class: n}}."""
    rng = np.random.default_rng(seed)
    for silo, classes in layout.items():
        for cls, n in classes.items():
            folder = root / silo / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    return root


def fed_cfg(path, workers=2, name="folder", **data_kw):
    return load_config(**{
        "data": {"name": name, "path": str(path), **data_kw},
        "model": {"kind": "unet", "size": "tiny", "conditional": True},
        "diffusion": {"steps": 10},
        "federation": {"workers": workers, "rounds": 1, "local_steps": 1, "batch_size": 4,
                       "level": "F", "partition": {"scheme": "natural"}},
    })


def test_natural_gives_worker_j_the_jth_silo_in_sorted_order():
    labels = np.array([0, 1, 0, 1, 2, 2])
    groups = np.array([7, 3, 3, 7, 9, 3])
    parts = data.partition(labels, "natural", n_workers=3, groups=groups)
    assert [p.tolist() for p in parts] == [[1, 2, 5], [0, 3], [4]]
    assert all(p.dtype == np.int64 for p in parts)
    with pytest.raises(FedscoreError, match="3 silos but the run has 2 workers"):
        data.partition(labels, "natural", n_workers=2, groups=groups)
    with pytest.raises(FedscoreError, match="give none"):
        data.partition(labels, "natural", n_workers=3)


def test_silo_folders_are_the_workers_and_a_silo_may_lack_a_class(tmp_path):
    root = write_silos(tmp_path / "d", {"clinic-b": {"cat": 5, "dog": 5},
                                       "clinic-a": {"cat": 10}})
    cfg = fed_cfg(root, test_fraction=0.2)
    images, labels = data.load(cfg.data, "train")
    groups = data.groups(cfg.data, "train")
    f = prepare(cfg)
    assert [len(p) for p in f.parts] == [8, 8]  # clinic-a (10 - 2 held out), clinic-b (4+4)
    hist = data.class_histogram(labels.numpy(), [p.cpu().numpy() for p in f.parts])
    assert hist.tolist() == [[8, 0], [4, 4]]  # cat = 0, dog = 1 across silos
    assert all((groups[p.cpu().numpy()] == j).all() for j, p in enumerate(f.parts))
    # the evaluation's per-silo statistics use the same silos
    assert [p.tolist() for p in silo_parts(cfg, labels)] == [p.tolist() for p in
                                                             worker_parts(cfg, labels.numpy())]
    assert images.shape[1:] == (1, 16, 16)


def test_an_npz_group_array_gives_the_silos(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8),
             y=np.arange(30) % 2, group=np.repeat([20, 10, 30], 10))
    cfg = fed_cfg(path, workers=3, name="arrays", hflip=True)
    f = prepare(cfg)
    groups = data.groups(cfg.data, "train")
    assert len(groups) == len(f.labels)  # mirror images keep their silo
    for j, p in enumerate(f.parts):
        assert (groups[p.cpu().numpy()] == j).all()
    assert sum(len(p) for p in f.parts) == len(f.labels)


def test_natural_on_a_dataset_without_silos_or_with_another_worker_count_is_clear(tmp_path):
    cfg = load_config(data={"name": "gmm:ring8"},
                      federation={"workers": 2, "partition": {"scheme": "natural"}})
    with pytest.raises(FedscoreError, match="natural.*give none"):
        prepare(cfg)
    root = write_silos(tmp_path / "d", {"a": {"x": 3}, "b": {"x": 3}, "c": {"x": 3}})
    with pytest.raises(FedscoreError, match="set federation.workers: 3"):
        prepare(fed_cfg(root, workers=2))


def test_fedscore_train_runs_a_federation_over_a_generated_folder(tmp_path):
    """End to end: `fedscore train` on a 16x16 folder of two silos (natural partition), two
    rounds of one local step, writes its run folder."""
    root = write_silos(tmp_path / "d", {"s0": {"0": 6, "1": 6}, "s1": {"0": 6, "1": 2}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "own", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "folder", "path": str(root)},
        "model": {"kind": "unet", "size": "tiny", "conditional": True},
        "diffusion": {"steps": 8},
        "train": {"eval_batch": 8},
        "sample": {"steps": 4, "n": 4},
        "federation": {"workers": 2, "rounds": 2, "local_steps": 1, "batch_size": 4,
                       "level": "M", "partition": {"scheme": "natural"}},
    }))
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "own"
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    rounds = records(run)
    assert [r["round"] for r in rounds][-1] in (1, 2) and len(rounds) == 2
    assert all(np.isfinite(r["loss"]) for r in rounds)
    partition = json.loads((run / "partition.json").read_text())
    assert partition["class_histogram"] == [[5, 5], [5, 2]]  # round(0.2 n) held out per class
    assert (run / "partition.png").read_bytes()[:4] == b"\x89PNG"
    assert torch.isfinite(torch.tensor([rounds[-1]["eq9_heldout"]])).all()
