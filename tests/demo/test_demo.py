"""`fedscore demo --quick` end to end: the report exists, holds its sections and finite
numbers, and a second run in the same folder reuses the trained models."""

import json
import math
import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.demo import BUDGETS, run_demo
from fedscore.errors import FedscoreError

SECTIONS = ["# fedscore demo", "## Results", "## Samples", "## Training loss",
            "## Pruning statistics", "## The silos", "## Timings", "## Files"]
ROWS = ["federated model", "federated inference, mean", "federated inference, mixture",
        "real training digits"]


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
    for stage in range(1, 6):
        assert f"[{stage}/5]" in output
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    for row in ROWS:
        assert f"| {row} |" in md, row
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # every figure it links exists
        assert (out / image).is_file(), image
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") >= 6


@pytest.mark.slow
def test_quick_demo_numbers_are_finite_and_consistent(quick_demo):
    out, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert [r["samples"] for r in results["rows"]] == ROWS
    for row in results["rows"]:
        for key in ("fid", "is_mean", "is_std", "class_accuracy", "recognisable"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row, key)
        assert 0.0 <= row["class_accuracy"] <= 1.0 and 0.0 <= row["recognisable"] <= 1.0
    real = results["rows"][-1]
    assert real["class_accuracy"] >= 0.9  # the classifier reads real digits
    pruning = results["pruning"]
    assert pruning["keep_fraction"] == pytest.approx([1.0] * 6 + [0.8] * 2 + [0.75] * 2,
                                                     abs=1e-3)  # level M, exact per tensor
    assert pruning["gamma_star"] == 6 and pruning["uncovered_total"] == 0
    assert 0.0 < pruning["upload_saving"] < 1.0
    assert results["total_s"] > 0 and set(results["timings_s"]) >= {
        "federated training", "agents", "sampling", "evaluation", "report"}
    # the federation and the agents hold the same ten silos (the demo checks it too)
    silos = json.loads((out / "federated" / "partition.json").read_text())["class_histogram"]
    assert results["facts"]["agent_counts"] == silos


@pytest.mark.slow
def test_a_second_run_reuses_the_trained_models(quick_demo):
    out, _ = quick_demo
    result = run_demo(out, quick=True, progress=False, echo=lambda _: None)
    facts = json.loads((out / "results.json").read_text())["facts"]
    assert facts["reused"] == {"federated training": True, "agents": True}
    assert "(reused from an earlier run)" in result.report.read_text()
    # another budget in the same folder is refused, not mixed in
    other = replace(BUDGETS["quick"], rounds=3)
    with pytest.raises(FedscoreError, match="another budget"):
        run_demo(out, budget=other, progress=False, echo=lambda _: None)


def test_an_unknown_budget_is_one_clear_error(tmp_path):
    with pytest.raises(FedscoreError, match="demo budget"):
        run_demo(tmp_path, budget="huge", echo=lambda _: None)
