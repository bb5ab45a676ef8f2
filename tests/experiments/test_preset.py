"""Experiment presets: the shipped ones validate at every budget (budgets are overrides,
not classes), ship inside the package, and a bad preset is one clear error naming the bad
key; lower layers of the library never import the application layer."""

import re
from pathlib import Path

import pytest
import yaml

import fedscore
from fedscore.errors import FedscoreError
from fedscore.experiments import load_preset, preset_names
from fedscore.experiments.preset import PRESETS

BUDGETS = {"pruning": ("cpu", "quick"), "federated-inference": ("cpu", "quick"),
           "demo": ("full", "gpu", "quick")}


def test_the_three_experiments_are_presets_shipped_inside_the_package():
    assert preset_names() == sorted(BUDGETS)
    assert PRESETS.parent == Path(fedscore.__file__).parent / "experiments"
    # an installed fedscore finds them: the YAML is package data
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"experiments/presets/*.yaml"' in pyproject


@pytest.mark.parametrize(("name", "budget"),
                         [(n, b) for n, budgets in BUDGETS.items() for b in budgets])
def test_every_preset_validates_at_every_budget(name, budget, tmp_path):
    preset = load_preset(name, budget=budget)
    assert preset.budget == budget and preset.reference in ("train", "test")
    for cell_name, cell in preset.cells.items():
        if cell.kind != "real":
            cfg = preset.cell_config(cell_name, tmp_path)
            assert cfg.data.name == preset.dataset and cfg.seed == preset.seed
            assert cfg.model.conditional  # class-conditional sample sets, one row per label


def test_a_budget_is_the_preset_with_its_overrides_merged():
    full, quick = load_preset("demo", budget="full"), load_preset("demo", budget="quick")
    fed_full = full.cell_config("federated", "runs").federation
    fed_quick = quick.cell_config("federated", "runs").federation
    assert (fed_full.rounds, fed_quick.rounds) == (50, 2)
    # what the budget does not name stays the preset's
    assert (fed_quick.policy, fed_quick.level, fed_quick.partition.scheme) == (
        "topk", "M", "dominant")
    assert quick.cell_config("federated", "runs").model.options == {
        "base": 8, "groups": 4, "num_downsamples": 1}
    # the federated cell samples as the experiment does (`fedscore sample` on its folder)
    sample = quick.cell_config("federated", "runs").sample
    assert (sample.method, sample.steps, sample.clip_denoised) == ("ancestral", 4, True)
    assert load_preset("pruning").budget == "cpu"  # the default budget
    assert load_preset("pruning", dataset="digits", seed=3).cell_config(
        "T-M", "runs").data.name == "digits"


def test_the_reproductions_score_against_train_and_the_demo_against_held_out_test():
    assert load_preset("pruning").reference == "train"
    assert load_preset("federated-inference").reference == "train"
    assert load_preset("demo").reference == "test"


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


GOOD = (PRESETS / "demo.yaml").read_text()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p["cells"]["federated"].update(confg={}),
     r"cells\.federated\.confg: unknown key"),
    (lambda p: p["sampling"].update(method="pf-ode"), r"sampling\.method"),
    (lambda p: p.update(reference="validation"), r"reference"),
    (lambda p: p["cells"]["agents"].update(aggregators=["median"]), r"aggregators"),
    (lambda p: p["cells"]["federated"]["config"]["federation"].update(rouds=3),
     r"cell 'federated' of experiment preset 'demo'\):\n  federation\.rouds: unknown key"),
])
def test_a_bad_preset_is_one_clear_error_naming_the_key(tmp_path, edit, match):
    raw = yaml.safe_load(GOOD)
    edit(raw)
    path = _write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(FedscoreError, match=match) as err:
        load_preset(path, budget="quick")
    assert "Traceback" not in str(err.value)


def test_unknown_presets_and_budgets_name_the_choices(tmp_path):
    with pytest.raises(FedscoreError, match="demo, federated-inference, pruning"):
        load_preset("table-3")
    with pytest.raises(FedscoreError, match="budget 'huge' of experiment 'demo'.*full, gpu, quick"):
        load_preset("demo", budget="huge")
    with pytest.raises(FedscoreError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")


IMPORT = re.compile(r"^\s*(?:from|import)\s+fedscore\.(runs|experiments|demo)\b", re.M)


@pytest.mark.parametrize("layer", ["inference", "federated", "diffusion"])
def test_lower_layers_never_import_the_application_layer(layer):
    root = Path(fedscore.__file__).parent / layer
    offenders = [f"{p.name}: fedscore.{m}" for p in sorted(root.glob("*.py"))
                 for m in IMPORT.findall(p.read_text())]
    assert offenders == []


def test_downsample_reads_the_dataset_at_a_fraction_of_its_resolution():
    preset = load_preset("pruning", overrides={"downsample": 2})
    assert preset.dataset == "mnist5k:14x14"
    assert preset.cell_config("T-M", "runs").data.name == "mnist5k:14x14"
    # a dataset named with its resolution, and images already under 16x16, stay as named
    assert load_preset("pruning", dataset="mnist5k:7x7",
                       overrides={"downsample": 2}).dataset == "mnist5k:7x7"
    assert load_preset("pruning", dataset="digits", overrides={"downsample": 2},
                       budget="quick").dataset == "digits"
    with pytest.raises(FedscoreError, match="downsample: 2 is for image datasets"):
        load_preset("pruning", dataset="gmm:ring8", overrides={"downsample": 2})


def test_the_baselines_get_budgets_comparable_to_what_they_are_compared_with():
    """The demo's centralised model is kept small: no more optimiser steps x batch than the
    federation's workers took together (BENCHMARKS: its cost); the FI preset's federated
    model trains on the heterogeneous agents' silos with their total steps x batch."""
    for budget in ("full", "gpu", "quick"):
        demo = load_preset("demo", budget=budget)
        central = demo.cell_config("central", "runs")
        fed = demo.cell_config("federated", "runs").federation
        assert central.federation == "none"
        assert (central.train.steps * central.train.batch_size
                <= fed.workers * fed.rounds * fed.local_steps * fed.batch_size)
        # sampled as every other row: the preset's one sampling
        assert (central.sample.method, central.sample.steps, central.sample.clip_denoised) == (
            demo.sampling.method, demo.sampling.steps, demo.sampling.clip)
    fi = load_preset("federated-inference", budget="cpu")
    assert fi.same_silos == ("federated", "heterogeneous")
    fed = fi.cell_config("federated", "runs").federation
    het = fi.cells["heterogeneous"]
    agents = fi.cell_config("heterogeneous", "runs").train
    assert fed.partition.scheme == "dominant" and fed.workers == het.n_agents
    assert (fed.workers * fed.rounds * fed.local_steps * fed.batch_size
            == het.n_agents * agents.steps * agents.batch_size)
    # the control agent is the centralised baseline: one agent on all the data
    assert fi.cells["control"].regime == "control" and "pooled" in fi.cells["control"].label
    for preset in (load_preset("demo"), fi):
        assert "route" in next(c for c in preset.cells.values()
                               if c.kind == "agents" and c.regime == "heterogeneous").aggregators


def test_a_central_cell_with_federation_settings_is_one_clear_error(tmp_path):
    raw = yaml.safe_load(GOOD)
    raw["cells"]["central"]["config"]["federation"] = {"workers": 2}
    with pytest.raises(FedscoreError, match="cell 'central' of experiment preset 'demo' is "
                                            "central .*remove its federation settings"):
        load_preset(_write(tmp_path, yaml.safe_dump(raw)), budget="quick")
