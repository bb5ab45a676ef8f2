"""Silo data (issue 18 item 2) and "model.num_classes wins everywhere": a SuperNode reads its
own folder or .npz (node config `data-path`) with the run config's options, made to the
config's shape; the server, which reads no data, and every silo build the same model, even
a silo that lacks the highest class. No Flower process is started: the ClientApp's
`prepared` is called with a node config dict."""

import numpy as np
import pytest
import torch
from PIL import Image

from fedscore.config import dump_config, load_config
from fedscore.data import shape_and_classes
from fedscore.errors import FedscoreError
from fedscore.federated.setup import model_setup, worker_round
from fedscore.flower.client_app import prepared


def write_classes(root, classes, n=4, size=32, rgb=True, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def server_cfg(**data_kw):
    """A run over silos' own images: the server's config names the data's shape and the
    label space, no path (the nodes hold the data)."""
    return load_config(**{
        "data": {"name": "folder", "image_size": 16, "channels": 1, **data_kw},
        "model": {"kind": "unet", "size": "tiny", "conditional": True, "num_classes": 3},
        "diffusion": {"steps": 10},
        "federation": {"workers": 2, "rounds": 1, "local_steps": 1, "batch_size": 4,
                       "level": "S", "policy": "random"},
    })


def shapes(params):
    return {k: tuple(v.shape) for k, v in params.items()}


def test_a_supernode_reads_its_own_folder_made_to_the_configs_shape(tmp_path):
    root = write_classes(tmp_path / "silo", ["0", "1"], n=5)  # 32x32 RGB images
    cfg = server_cfg()
    f = prepared(dump_config(cfg), {"partition-id": 1, "num-partitions": 2,
                                    "data-path": str(root)})
    assert f.images.shape == (8, 1, 16, 16)  # the training split: 4 of 5 per class
    assert sorted(f.labels.tolist()) == [0] * 4 + [1] * 4
    assert all(torch.equal(p, torch.arange(8)) for p in f.parts)  # all of it, no partition
    theta, _, _, losses = worker_round(f, f.init_params, 0, 1)
    assert torch.isfinite(losses).all()
    assert shapes(theta) == shapes(f.init_params)


def test_a_conditional_silo_lacking_the_highest_class_builds_the_servers_model(tmp_path):
    cfg = server_cfg()
    server = model_setup(cfg)  # no data read: sized by the config
    assert shape_and_classes(cfg) == ((1, 16, 16), 3)
    root = write_classes(tmp_path / "silo", ["0", "1"])  # class 2 missing here
    silo = prepared(dump_config(cfg), {"partition-id": 0, "num-partitions": 2,
                                       "data-path": str(root)})
    assert shapes(silo.init_params) == shapes(server.init_params)
    for k, v in server.init_params.items():  # same seed, same theta_0
        torch.testing.assert_close(silo.init_params[k], v)


def test_an_npz_silo_is_read_by_its_suffix(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "silo.npz"
    np.savez(path, x=rng.random((10, 3, 20, 20)), y=np.arange(10) % 3)
    f = prepared(dump_config(server_cfg()), {"partition-id": 0, "num-partitions": 2,
                                             "data-path": str(path)})
    # the training split: round(0.2 n_c) of each class (4, 3, 3 images) held out
    assert f.images.shape == (7, 1, 16, 16) and f.images.min() >= -1 and f.images.max() <= 1
    assert torch.bincount(f.labels).tolist() == [3, 2, 2]


def test_labels_beyond_num_classes_on_a_silo_are_one_clear_error(tmp_path):
    root = write_classes(tmp_path / "silo", ["0", "3"])
    with pytest.raises(FedscoreError, match=r"labels 0..3.*knows 3 classes.*num_classes"):
        prepared(dump_config(server_cfg()), {"partition-id": 0, "num-partitions": 2,
                                             "data-path": str(root)})


def test_named_class_folders_on_a_silo_need_data_classes(tmp_path):
    root = write_classes(tmp_path / "silo", ["dog", "cat"])
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(root)}
    with pytest.raises(FedscoreError, match="set data.classes"):
        prepared(dump_config(server_cfg()), node)
    f = prepared(dump_config(server_cfg(classes=["bird", "cat", "dog"])), node)
    assert sorted(set(f.labels.tolist())) == [1, 2]  # cat = 1, dog = 2 on every silo


def test_a_silo_run_needs_its_size_in_the_config_and_image_data(tmp_path):
    root = write_classes(tmp_path / "silo", ["0"])
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(root)}
    unsized = load_config(data={"name": "folder"}, model={"kind": "unet"},
                          federation={"workers": 2})
    with pytest.raises(FedscoreError, match="data.image_size and data.channels"):
        prepared(dump_config(unsized), node)
    vectors = load_config(data={"name": "gmm:ring8"}, federation={"workers": 2})
    with pytest.raises(FedscoreError, match="holds images"):
        prepared(dump_config(vectors), node)
    with pytest.raises(FedscoreError, match="does not exist"):
        prepared(dump_config(server_cfg()), {**node, "data-path": str(tmp_path / "none")})


def test_num_classes_wins_for_central_training_too(tmp_path):
    """`fedscore train` without federation sizes the label table from model.num_classes,
    and refuses data whose labels lie beyond it, before writing a model."""
    from fedscore.runs.train import load_model, train_central

    root = write_classes(tmp_path / "d", ["0", "1"], n=5, size=8, rgb=False)
    base = {"name": "c", "out_dir": str(tmp_path / "runs"), "data": {"name": "folder",
            "path": str(root)}, "diffusion": {"steps": 5}, "sample": {"steps": 2},
            "train": {"steps": 2, "batch_size": 4, "eval_batch": 4, "log_every": 1,
                      "checkpoint_every": 2}}
    cfg = load_config(**base, model={"kind": "unet", "conditional": True, "num_classes": 4})
    train_central(cfg, progress=False)
    model, _ = load_model(tmp_path / "runs" / "c")
    assert shape_and_classes(cfg) == ((1, 8, 8), 4)
    small = load_config(**{**base, "name": "small"},
                        model={"kind": "unet", "conditional": True, "num_classes": 1})
    with pytest.raises(FedscoreError, match="num_classes to at least 2"):
        train_central(small, progress=False)
    assert not (tmp_path / "runs" / "small").exists()  # refused before anything is written


def test_data_root_still_reads_the_runs_builtin_dataset_on_a_node():
    cfg = load_config(data={"name": "gmm:ring8"}, model={"options": {"hidden": 8, "depth": 1}},
                      diffusion={"steps": 5},
                      federation={"workers": 2, "batch_size": 4, "local_steps": 1})
    f = prepared(dump_config(cfg), {"partition-id": 0, "num-partitions": 2,
                                    "data-root": "/nowhere"})  # unused by gmm draws
    assert f.images.shape == (4000, 2)
    assert all(len(p) == 4000 for p in f.parts)  # all of it, no partition
