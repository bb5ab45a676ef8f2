"""build_model resolves every kind by name; bad names and arguments are one clear error."""

import subprocess
import sys

import pytest

from fedscore.errors import FedscoreError
from fedscore.models import MODELS, ScoreMLP, UNet, build_model


def test_every_kind_is_registered():
    assert set(MODELS) == {"mlp", "unet", "diffusers-unet", "fi-paper"}
    assert isinstance(build_model("mlp", dim=2, size="tiny"), ScoreMLP)  # size ignored
    assert isinstance(build_model("unet", in_channels=1, image_size=8), UNet)


@pytest.mark.parametrize(("kind", "kwargs", "match"), [
    ("transformer", {}, "choose one of: diffusers-unet, fi-paper, mlp, unet"),
    ("mlp", {"dim": 2, "widht": 3}, r"no argument\(s\) \['widht'\].*hidden"),
    ("mlp", {}, r"needs argument\(s\) \['dim'\]"),
    ("unet", {"in_channels": 1}, r"needs argument\(s\) \['image_size'\]"),
    ("unet", {"in_channels": 1, "image_size": 8, "chanel_mults": (1,)}, "chanel_mults"),
])
def test_bad_names_and_arguments_are_clear_errors(kind, kwargs, match):
    with pytest.raises(FedscoreError, match=match):
        build_model(kind, **kwargs)


def test_importing_the_models_does_not_import_diffusers():
    code = "import sys, fedscore.models; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
