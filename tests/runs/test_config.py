"""Configs are validated at the edge: one clear message naming the field."""

import pytest

from fedscore.config import dump_config, load_config
from fedscore.errors import FedscoreError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.steps=7", "name=x"])
    assert cfg.train.steps == 7 and cfg.name == "x"
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("train:\n  stepz: 10\n", "train.stepz", "unknown key"),
        ("sample:\n  method: heun\n", "sample.method", "exp-integrator"),
        ("diffusion:\n  grid: cosine\n", "diffusion.grid", "exponential"),
        ("diffusion:\n  T: 1.0\n  delta: 2.0\n", "diffusion", "delta must be smaller"),
        ("diffusion:\n  steps: 0\n", "diffusion.steps", "greater than or equal to 1"),
        ("train:\n  lr: fast\n", "train.lr", "number"),
    ],
)
def test_a_bad_config_names_the_field_and_what_is_allowed(tmp_path, text, field, hint):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FedscoreError) as err:
        load_config(path)
    assert field in str(err.value) and hint in str(err.value)
    assert "Traceback" not in str(err.value)


def test_missing_or_malformed_config_files_are_clear_errors(tmp_path):
    with pytest.raises(FedscoreError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(FedscoreError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FedscoreError, match="key.sub=value"):
        load_config(None, ["train.steps"])
