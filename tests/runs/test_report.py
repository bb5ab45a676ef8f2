"""`fedscore report`: runs side by side in one report.md, rebuilt from the run folders alone."""

import json

import pytest

from fedscore.config import dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.runs.evaluate import evaluate_run, sample_run
from fedscore.runs.report import report_runs
from fedscore.runs.train import train_central

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    """A real (tiny) centralised run on the ring: trained, sampled, evaluated."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None, name="ring", out_dir=str(out), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion={"grid": "exponential", "steps": 30, "T": 5.0, "delta": 1e-3},
        train={"steps": 30, "batch_size": 64, "log_every": 10, "checkpoint_every": 30,
               "eval_batch": 64},
        sample={"steps": 20},
    )
    train_central(cfg, progress=False)
    sample_run(out / "ring", 200, progress=False)
    evaluate_run(out / "ring", progress=False)
    return out / "ring"


# Per-round records as the federated engine logs them (fedscore.runs.federated).
ROUNDS = [
    {"round": 1, "loss": 0.9, "gamma_star": 3, "min_coverage": 3, "uncovered": 0, "w2": 0.2,
     "bytes_sent": [100, 80, 60], "bytes_received": 400, "keep_fraction": [1.0, 0.8, 0.6]},
    {"round": 2, "loss": 0.7, "gamma_star": 2, "min_coverage": 2, "uncovered": 5, "w2": 0.25,
     "bytes_sent": [100, 70, 60], "bytes_received": 400, "keep_fraction": [1.0, 0.7, 0.6]},
]


@pytest.fixture()
def federated_run(tmp_path, central_run):
    """A hand-made federated run folder: config, per-round pruning records, scores, samples."""
    run = tmp_path / "topk-M"
    run.mkdir()
    cfg = load_config(None, name="topk-M", data={"name": "digits"},
                      model={"kind": "unet", "size": "tiny", "conditional": True},
                      federation={"workers": 3, "rounds": 2, "keep_ratios": [1.0, 0.8, 0.6]})
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROUNDS))
    (run / "eval.json").write_text(json.dumps({
        "fid": 12.345, "is_mean": 7.5, "is_std": 0.25, "class_accuracy": 0.875,
        "real_statistics": {"merged": True, "silos": 3}, "custom_score": 0.5}))
    (run / "samples.png").write_bytes((central_run / "samples.png").read_bytes())
    return run


def _section(text, title):
    """The lines of one '## title' section."""
    part = text.split(f"## {title}\n", 1)[1]
    return part.split("\n## ", 1)[0].strip()


def test_two_runs_side_by_side(central_run, federated_run, tmp_path):
    out = tmp_path / "report"
    report = report_runs([central_run, federated_run], out)
    assert report == out / "report.md"
    text = report.read_text()
    for title in ("Runs", "Scores", "Training loss", "Pruning statistics", "Samples"):
        assert f"\n## {title}\n" in text, title

    runs = _section(text, "Runs")
    assert "centralised: 30 steps" in runs
    assert "federated: 3 workers, 2 rounds, policy topk, [1.0, 0.8, 0.6]" in runs
    assert "| 0.7 / –" in runs  # final loss of the federated run; it logged no eq. 9

    scores = _section(text, "Scores")
    header = scores.splitlines()[0]
    assert header == "| metric | ring | topk-M |"
    ring = json.loads((central_run / "eval.json").read_text())
    assert f"| MMD² ↓ | {ring['mmd2']:.4g} | – |" in scores
    assert "| FID (domain features) ↓ | – | 12.35 |" in scores
    assert "| IS ↑ | – | 7.5 ± 0.25 |" in scores
    assert "| custom_score | – | 0.5 |" in scores  # unknown numeric keys are kept
    assert "Federated evaluation for topk-M" in scores

    # both x axes in use: steps for the centralised run, rounds for the federated one
    assert "![training loss per step](loss_step.png)" in text
    assert "![training loss per round](loss_round.png)" in text
    assert (out / "loss_step.png").read_bytes()[:4] == PNG
    assert (out / "loss_round.png").read_bytes()[:4] == PNG

    pruning = _section(text, "Pruning statistics")
    assert "| Γ* (final) | – | 2 |" in pruning
    assert "| min coverage (min over rounds) | – | 2 |" in pruning
    assert "| uncovered coordinates (sum over rounds) | – | 5 |" in pruning
    assert "| w² (max over rounds) | – | 0.25 |" in pruning
    assert "| bytes up per round (mean) | – | 235 |" in pruning  # (240 + 230) / 2
    assert "| keep fraction (mean) | – | 0.7833 |" in pruning  # (0.8 + 0.7667) / 2
    assert (out / "pruning.png").read_bytes()[:4] == PNG

    for label in ("ring", "topk-M"):
        assert f"![samples of {label}](samples-{label}.png)" in text
        assert (out / f"samples-{label}.png").read_bytes()[:4] == PNG


def test_runs_without_scores_or_records_are_reported_as_such(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, name="fresh")))
    text = report_runs([run], tmp_path / "out").read_text()
    assert "not evaluated (run `fedscore evaluate` on it)" in text
    assert "No run has an eval.json yet" in text
    assert "No loss records in metrics.jsonl." in text
    assert "No samples.png" in text
    assert "## Pruning statistics" not in text  # only when the runs logged them


def test_runs_with_the_same_folder_name_get_distinct_columns(central_run, tmp_path):
    copies = []
    for parent in ("a", "b"):
        dest = tmp_path / parent / "ring"
        dest.mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl", "eval.json", "samples.png"):
            (dest / name).write_bytes((central_run / name).read_bytes())
        copies.append(dest)
    text = report_runs(copies, tmp_path / "out").read_text()
    assert "| metric | a/ring | b/ring |" in text
    assert "](samples-a_ring.png)" in text and "](samples-b_ring.png)" in text
    assert (tmp_path / "out" / "samples-b_ring.png").read_bytes()[:4] == PNG


def test_bad_run_lists_are_clear_errors(tmp_path):
    with pytest.raises(FedscoreError, match="at least one run folder"):
        report_runs([], tmp_path / "out")
    with pytest.raises(FedscoreError, match="does not exist"):
        report_runs([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedscoreError, match="not a run folder"):
        report_runs([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a refused report writes nothing
