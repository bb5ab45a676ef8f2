"""The pruning paper's experiment through the one runner (the preset `pruning`, quick
budget on the 8x8 digits; the FI experiment and the demo have their own end-to-end tests in
tests/inference/test_experiment.py and tests/demo/test_demo.py), and the runner's
refusals."""

import json
import math

import pytest
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.errors import FedscoreError
from fedscore.experiments import run_experiment

RUNS = [f"{p}-{lv}" for p in "RT" for lv in "FLMS"]


@pytest.mark.slow
def test_quick_pruning_reproduction_writes_table_2_and_the_loss_curves(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "pruning", "--budget", "quick",
                                      "--dataset", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for stage in range(1, 12):  # eight cells, sampling, evaluation, report
        assert f"[{stage}/11]" in result.output
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Federated training with arbitrary pruning — digits")
    # 20 samples a run: one IS split, said in the header; FID against the training split
    assert ("| samples | final loss | held-out eq. 9 | FID vs train split ↓ | "
            "IS ± std (1 split) ↑ | class accuracy ↑ | Γ* | bytes sent / round |") in md
    for run in RUNS:
        assert f"| {run} |" in md, run
    assert "R: measured order" in md and "T: measured order" in md
    assert "![training loss](loss.png)" in md and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")

    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["samples"] for r in results["rows"]] == RUNS
    gammas = {}
    for r in results["rows"]:
        for key in ("fid", "is_mean", "final_loss", "eq9"):
            assert math.isfinite(r[key]), (r, key)
        assert (r["reference"], r["n_samples"], r["is_splits"]) == ("train", 20, 1)
        assert r["bytes_sent"] > 0 and f"{r['policy']}-{r['level']}" == r["samples"]
        gammas[r["samples"]] = r["gamma_star"]
    # level F keeps every coordinate on all five workers; pruned levels keep fewer
    assert gammas["R-F"] == gammas["T-F"] == 5 and gammas["T-S"] < 5
    sent = {r["samples"]: r["bytes_sent"] for r in results["rows"]}
    assert sent["T-S"] < sent["T-M"] < sent["T-F"]


def test_the_runner_refuses_a_dataset_that_is_not_images(tmp_path):
    with pytest.raises(FedscoreError, match="needs an image dataset"):
        run_experiment("pruning", tmp_path, budget="quick", dataset="gmm:ring8",
                       echo=lambda _: None)


def test_on_a_gpu_the_demo_takes_its_gpu_budget_unless_a_budget_is_named(tmp_path, monkeypatch):
    """`make demo` on a machine with CUDA trains the `gpu` budget (the preset's
    device_budgets); a budget named by the caller wins. Stopped before any training."""
    import torch

    from fedscore.experiments import runner
    from fedscore.runtime import Runtime

    class Stop(Exception):
        pass

    seen = []

    def stop(cfg, **_):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(runner, "preset_runtime", lambda p: Runtime(torch.device("cuda")))
    monkeypatch.setattr(runner, "train_federation", stop)
    with pytest.raises(Stop):
        run_experiment("demo", tmp_path, progress=False, echo=lambda _: None)
    with pytest.raises(Stop):
        run_experiment("demo", tmp_path, budget="full", progress=False, echo=lambda _: None)
    gpu, full = seen
    assert gpu.data.name == "mnist5k" and gpu.federation.rounds == 200  # full resolution
    assert full.data.name == "mnist5k:14x14" and full.federation.rounds < 200
