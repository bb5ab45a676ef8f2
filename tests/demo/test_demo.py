"""`fedscore demo --quick` end to end (the preset `demo` through the one runner): the report
exists, holds its sections and finite numbers, every table names its reference split, and a
second run in the same folder reuses the trained models."""

import json
import math
import re

import pytest
import yaml
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.errors import FedscoreError
from fedscore.experiments import run_experiment

SECTIONS = ["# fedscore demo", "## Results", "## Verdict", "## Samples", "## Training loss",
            "## Pruning statistics", "## The silos", "## Timings", "## Files"]
ROWS = ["federated model", "centralised model (pooled data)", "federated inference, mean",
        "federated inference, weighted", "federated inference, mixture",
        "federated inference, route", "real training digits"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(quick_demo):
    out, output = quick_demo
    assert f"report: {out / 'report.md'}" in output
    assert "total wall time:" in output
    for stage in range(1, 8):  # four cells, sampling, evaluation, report
        assert f"[{stage}/7]" in output
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    for row in ROWS:
        assert f"| {row} |" in md, row
    # 10 samples a set: one IS split, said in the table; FID against the held-out test split
    assert "| samples | FID vs test split ↓ | IS ± std (1 split) ↑ |" in md
    # the baselines side by side in that one table, their sampling cost in its last column
    assert "network evaluations / sample / step |" in md
    assert "Against the centralised model on the pooled data" in md
    assert "`route` samples the agents' mixture at 1 network evaluation(s)" in md
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # every figure it links exists
        assert (out / image).is_file(), image
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") >= 6


@pytest.mark.slow
def test_quick_demo_numbers_are_finite_and_consistent(quick_demo):
    out, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "demo" and results["budget"] == "quick"
    assert [r["samples"] for r in results["rows"]] == ROWS
    for row in results["rows"]:
        for key in ("fid", "is_mean", "is_std", "class_accuracy", "unrecognisable"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row, key)
        assert 0.0 <= row["class_accuracy"] <= 1.0 and 0.0 <= row["unrecognisable"] <= 1.0
        assert (row["reference"], row["n_samples"], row["is_splits"]) == ("test", 10, 1)
    rows = {r["samples"]: r for r in results["rows"]}
    # one model, and route, evaluate one network per sample per step; the others all ten
    assert [r.get("evals_per_step") for r in results["rows"]] == [1, 1, 10, 10, 10, 1, None]
    assert rows["federated inference, route"]["aggregator"] == "route"
    # the centralised model trained on the whole training split, alone
    central = yaml.safe_load((out / "central" / "config.yaml").read_text())
    assert central["federation"] == "none" and (out / "central" / "model.safetensors").is_file()
    real = results["rows"][-1]
    assert real["class_accuracy"] >= 0.9  # the classifier reads real digits
    pruning = results["pruning"]["federated"]
    assert pruning["keep_fraction"] == pytest.approx([1.0] * 6 + [0.8] * 2 + [0.75] * 2,
                                                     abs=1e-3)  # level M, exact per tensor
    assert pruning["gamma_star"] == 6 and pruning["uncovered_total"] == 0
    assert 0.0 < pruning["upload_saving"] < 1.0
    assert results["rows"][0]["gamma_star"] == 6
    assert results["total_s"] > 0 and set(results["timings_s"]) >= {
        "train federated", "train central", "train agents", "sampling", "evaluation",
        "report"}
    # the federation and the agents hold the same ten silos (the runner checks it too)
    silos = json.loads((out / "federated" / "partition.json").read_text())["class_histogram"]
    assert results["class_counts"]["agents"] == silos


@pytest.mark.slow
def test_a_second_run_reuses_the_trained_models(quick_demo):
    out, _ = quick_demo
    result = run_experiment("demo", out, budget="quick", progress=False, echo=lambda _: None)
    reused = json.loads((out / "results.json").read_text())["reused"]
    assert reused == {"federated": True, "central": True, "agents": True, "real": False}
    assert "(reused from an earlier run)" in result.report.read_text()
    # another budget in the same folder is refused, not mixed in
    other = {"cells": {"federated": {"config": {"federation": {"rounds": 3}}}}}
    with pytest.raises(FedscoreError, match="another budget"):
        run_experiment("demo", out, budget="quick", overrides=other, progress=False,
                       echo=lambda _: None)
    other = {"cells": {"central": {"config": {"train": {"steps": 3}}}}}
    with pytest.raises(FedscoreError, match="holds a central run of another budget"):
        run_experiment("demo", out, budget="quick", overrides=other, progress=False,
                       echo=lambda _: None)


def test_an_unknown_budget_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "run", "demo", "--budget", "huge",
                                      "--out", str(tmp_path)])
    assert isinstance(result.exception, FedscoreError)
    assert "unknown budget 'huge' of experiment 'demo'" in str(result.exception)
    assert not (tmp_path / "federated").exists()  # refused before any work
