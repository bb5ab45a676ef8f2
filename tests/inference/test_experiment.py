"""The FI paper's experiment end to end (the preset `federated-inference` at its quick budget
on the 8x8 digits, through the one runner), and `fedscore agents sample` / `diagnose`."""

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import (
    AGGREGATOR_NAMES,
    diagnose_agents,
    sample_agents,
    train_agents,
)
from fedscore.runs.evaluate import load_samples


def test_unknown_budget_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "federated-inference", "--budget", "huge",
                                      "--dataset", "digits", "--out", str(tmp_path)])
    assert isinstance(result.exception, FedscoreError)
    assert "choose one of: cpu, smoke, quick" in str(result.exception)


def tiny_agents_config(tmp_path):
    return load_config(
        None, name="agents", out_dir=str(tmp_path), data={"name": "digits"},
        model={"kind": "unet", "conditional": True, "options": {"base": 8, "groups": 4}},
        diffusion={"grid": "exponential", "steps": 10, "T": 5.0, "delta": 1e-3},
        train={"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 2,
               "eval_batch": 4},
        sample={"steps": 2},
    )


def test_diagnose_agents_writes_the_papers_table_for_any_aggregator(tmp_path):
    cfg = tiny_agents_config(tmp_path)
    dirs = train_agents(cfg, "heterogeneous", tmp_path / "het", n_agents=2, progress=False)
    md = diagnose_agents(dirs, tmp_path / "diag", aggregator="weighted", n_inputs=3)
    with open(tmp_path / "diag" / "diagnostics-weighted.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 10 * 4 * 2  # labels x paper times x {noise, real}
    for r in records:
        assert math.isfinite(float(r["magnitude"])) and float(r["magnitude"]) > 0
        assert -1 <= float(r["cosine"]) <= 1 + 1e-9
    table = md.read_text().splitlines()
    assert sum(line.startswith("| ") and "noise" in line for line in table) == 10
    assert "t=0.01 cos" in table[2]


@pytest.mark.slow
def test_quick_reproduction_writes_report_grids_and_diagnostics(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "federated-inference", "--budget", "quick",
                                      "--dataset", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    for section in ("## Results", "## Verdict", "## Samples",
                    "## Score diagnostics", "### homogeneous", "### heterogeneous",
                    "## The silos", "## Timings"):
        assert section in text, section
    assert "`mixture` **beats** `mean`" in text or "`mixture` **does not beat**" in text
    # 20 samples a set: one IS split, said in the table; FID against the training split
    assert "| samples | IS ± std (1 split) ↑ | FID vs train split ↓ |" in text

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    expected = [("control", "single agent")] + [
        (r, a) for r in ("homogeneous", "heterogeneous") for a in AGGREGATOR_NAMES] + [
        ("heterogeneous", None)]  # the federated model on the heterogeneous agents' silos
    assert [(r["regime"], r.get("aggregator")) for r in rows] == expected
    assert rows[-1]["training"] == "federated" and rows[-1]["gamma_star"] >= 1
    # the baselines side by side: one network evaluation per sample per step for one model
    # and for route, ten for the other aggregators of ten agents
    assert [r["evals_per_step"] for r in rows] == [1] + [
        1 if a == "route" else 10 for _, a in expected[1:-1]] + [1]
    assert "Against the centralised model on the pooled data" in text
    assert ("The federation (`federated`) and the agents of `heterogeneous` hold exactly the "
            "same silos (checked).") in text
    assert "The `control` row is the centralised baseline" in text
    for r in rows:
        for key in ("is_mean", "is_std", "fid", "unrecognisable", "class_accuracy"):
            assert math.isfinite(r[key]), (r, key)
        assert 0 <= r["unrecognisable"] <= 1 and 0 <= r["class_accuracy"] <= 1
        assert 1 <= r["is_mean"] <= 10 and r["fid"] >= 0
        assert (r["reference"], r["n_samples"], r["is_splits"]) == ("train", 20, 1)
    assert results["budget"] == "quick"
    assert results["resolved"]["cells"]["heterogeneous"]["n_agents"] == 10
    assert len(list((tmp_path / "grids").glob("*.png"))) == len(expected)
    for regime in ("homogeneous", "heterogeneous"):
        csv = (tmp_path / "diagnostics" / f"{regime}-mean.csv").read_text().splitlines()
        assert len(csv) == 1 + 10 * 4 * 2  # header + labels x times x {noise, real}
    # the heterogeneous agents' counts are what the server weighted by: 50% own digit
    het = results["class_counts"]["heterogeneous"]
    assert all(c[j] * 2 == sum(c) for j, c in enumerate(het))


def test_sample_agents_writes_samples_fedscore_evaluate_can_read(tmp_path):
    cfg = tiny_agents_config(tmp_path)
    dirs = train_agents(cfg, "heterogeneous", tmp_path / "het", n_agents=2, progress=False)
    paths = sample_agents(dirs, tmp_path / "fi", aggregator="mixture", per_label=2, steps=3,
                          seed=5, progress=False)
    x, labels = load_samples(paths["samples"], (1, 8, 8))
    assert x.shape == (20, 1, 8, 8) and bool(torch.isfinite(x).all())
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]  # one row per label
    assert paths["figure"].is_file()
    again = sample_agents(dirs, tmp_path / "fi2", aggregator="mixture", per_label=2, steps=3,
                          seed=5, progress=False)  # seeded: the same samples
    assert torch.equal(load_samples(again["samples"], (1, 8, 8))[0], x)
    with pytest.raises(FedscoreError, match="aggregator"):
        sample_agents(dirs, tmp_path / "bad", aggregator="median", progress=False)
