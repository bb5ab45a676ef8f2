"""Packaging metadata (issue 18 item 8): the optional extras a user is told to install
exist, torch/torchvision keep floors without caps, and the build backend's floor reads the
SPDX `license` string."""

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads(
    (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))


def requirement(specs: list[str], name: str) -> str:
    (found,) = [s for s in specs if re.match(rf"{re.escape(name)}\s*(\[|[<>=!~]|$)", s)]
    return found


def test_torch_and_torchvision_have_floors_and_no_caps():
    deps = PYPROJECT["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        spec = requirement(deps, name)
        assert ">=" in spec and "<" not in spec and "==" not in spec, spec


def test_the_extras_errors_name_exist_and_dev_installs_them():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert requirement(extras["diffusers"], "diffusers").startswith("diffusers>=0.30")
    assert requirement(extras["simulation"], "flwr").startswith("flwr[simulation]")
    (self_ref,) = [s for s in extras["dev"] if s.startswith("fedscore[")]
    assert {"simulation", "diffusers"} <= set(self_ref[9:-1].split(","))


def test_the_setuptools_floor_reads_an_spdx_license_string():
    assert isinstance(PYPROJECT["project"]["license"], str)  # PEP 639: setuptools >= 77
    (spec,) = [s for s in PYPROJECT["build-system"]["requires"] if s.startswith("setuptools")]
    floor = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
    assert floor >= (77,), spec
