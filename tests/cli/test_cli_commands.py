"""The CLI's commands call their library functions and write where they say."""

from typer.testing import CliRunner

from fedscore.cli import app

PARAMS = """L: 2.0
w: 0.3
sigma1: 0.5
sigma2: 0.4
N: 10
gamma_star: 6
S: 2
Q: 1000
F0: 3.0
FQ: 1.0
theta0_sq: 50.0
eta: 1e-3
observed_lhs: 0.5
"""


def test_bound_with_given_constants_writes_the_report(tmp_path):
    params = tmp_path / "constants.yaml"
    params.write_text(PARAMS)
    result = CliRunner().invoke(app, ["bound", "--params", str(params), "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "b" / "bound.md").read_text()
    assert "dominant term" in text and (tmp_path / "b" / "bound_vs_Q.png").is_file()


def test_bound_needs_exactly_one_source(tmp_path):
    result = CliRunner().invoke(app, ["bound"])
    assert result.exit_code != 0
    assert "RUN_DIR or --params" in str(result.exception)


def test_sample_evaluate_report_on_a_toy_run(tmp_path):
    runner = CliRunner()
    out = tmp_path / "toy"
    result = runner.invoke(app, ["train", "--out", str(out), "--set", "train.steps=30",
                                 "--set", "train.log_every=10", "--set",
                                 "model.options={hidden: 32, depth: 1}"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["sample", str(out), "--n", "200"]).exit_code == 0
    assert (out / "samples.npz").is_file()
    result = runner.invoke(app, ["evaluate", str(out), "--n", "200"])
    assert result.exit_code == 0, result.output
    assert (out / "eval.json").is_file()
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "Scores" in (tmp_path / "rep" / "report.md").read_text()
