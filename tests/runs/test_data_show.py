"""`fedscore data show`: what a config's own data are as a run reads them (issue 18)."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.errors import FedscoreError


def silo_folder(root, counts):
    rng = np.random.default_rng(0)
    for silo, per_class in counts.items():
        for name, n in per_class.items():
            folder = root / silo / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    return root


def test_data_show_names_classes_silos_and_writes_its_figures(tmp_path):
    root = silo_folder(tmp_path / "d", {"site-b": {"cat": 6, "dog": 2},
                                        "site-a": {"cat": 2, "dog": 10}})
    out = tmp_path / "show"
    result = CliRunner().invoke(app, [
        "data", "show", "--out", str(out), "--set", "data.name=folder",
        "--set", f"data.path={root}", "--set", "data.test_fraction=0.25",
        "--set", "federation.workers=2", "--set", "federation.partition.scheme=natural",
        "--set", "federation.level=F"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["shape"] == [1, 12, 12]
    assert shown["classes"] == {"cat": 0, "dog": 1}  # sorted names numbered 0, 1
    # 25% held out per (silo, class), rounded: 2 + 0 + 0 + 2 (round half to even)
    assert shown["train"] + shown["test"] == 20 and shown["test"] == 4
    assert sum(shown["train_per_class"].values()) == shown["train"]
    # natural partition: the silo folders, sorted, are the workers
    assert list(shown["workers"]) == ["site-a", "site-b"]
    assert sum(shown["workers"].values()) == shown["train"]
    assert shown["workers"]["site-a"] > shown["workers"]["site-b"]
    assert (out / "preview.png").stat().st_size > 0
    assert (out / "partition.png").stat().st_size > 0


def test_data_show_of_a_bad_folder_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["data", "show", "--out", str(tmp_path / "o"),
                                      "--set", "data.name=folder",
                                      "--set", f"data.path={tmp_path / 'empty'}"])
    # the CLI's main() prints a FedscoreError as one line (tests/cli); here: it is one
    assert isinstance(result.exception, FedscoreError), result.output
    assert "is empty" in str(result.exception)
    assert not (tmp_path / "o").exists()
