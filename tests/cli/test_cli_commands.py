"""The CLI's commands call their library functions and write where they say."""

from pathlib import Path

from typer.testing import CliRunner

from fedscore.cli import app

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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


def test_flower_run_refuses_a_node_count_that_is_not_the_worker_count(tmp_path):
    result = CliRunner().invoke(app, ["flower", "run", "--config",
                                        str(CONFIGS / "flower-toy.yaml"),
                                 "--nodes", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "one SuperNode per worker" in str(result.exception) + result.output


def test_flower_app_writes_a_valid_flower_app(tmp_path):
    import tomllib

    from flwr.common.config import validate_config

    result = CliRunner().invoke(app, ["flower", "app", str(tmp_path / "app")])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True)
    assert ok, errors
