"""The CLI's rough edges of issue 18 item 7, each as a new user met it: eval.json written
over another run's scores, no --data-root for `features train`, no --version and no -h, help
texts whose brackets rich markup ate, a bare `fedscore train` starting a toy run, a missing
optional dependency as a bare ModuleNotFoundError."""

import json
import re
import shutil
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from cli_harness import run_main
from fedscore.cli import EXPORT_FORMATS, app, package_version
from fedscore.errors import FedscoreError
from fedscore.runs.evaluate import EVAL, eval_path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["--set", "train.steps=2", "--set", "train.eval_batch=4", "--set",
        "model.options={hidden: 8, depth: 1}", "--set", "diffusion.steps=5"]




def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def commands(group: click.Group, path=()):
    """Every command path of the CLI, groups included: ("flower", "run"), ..."""
    yield path
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


CLICK_APP = typer.main.get_command(app)
ALL_COMMANDS = list(commands(CLICK_APP))


def command_of(path) -> click.Command:
    command = CLICK_APP
    for name in path:
        command = command.commands[name]
    return command


def flat(text: str) -> str:
    """Help as one line: rich's box characters and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# ---------------------------------------------------------------- --version, -h, help texts


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"fedscore {package_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", package_version())


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "fedscore")
def test_dash_h_is_help_on_every_command(path):
    result = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


KEY_PHRASES = {
    ("flower", "run"): ["pip install 'fedscore[simulation]'", "[default: loopback]"],
    ("evaluate",): ["--out", "eval.json goes next to it", "never into another run's folder"],
    ("features", "train"): ["--data-root", "torchvision's layout"],
    ("export",): ["--format", "diffusers", "--overwrite", "DDPMPipeline.from_pretrained"],
    ("train",): ["--config", "YAML run config"],
    (): ["--version", "export", "flower"],
}


@pytest.mark.parametrize("path", list(KEY_PHRASES), ids=lambda p: " ".join(p) or "fedscore")
def test_help_texts_render_their_brackets_and_key_phrases(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for phrase in KEY_PHRASES[path]:
        assert phrase in text, (phrase, text)


def test_no_help_string_holds_a_bracket_rich_markup_would_eat():
    # rich reads '[' + a letter, '#', '/' or '@' as a style tag and drops it; a literal one
    # is written '\\['. Any new help string with a bare one fails here, not in a user's shell.
    tag = re.compile(r"(?<!\\)\[[a-zA-Z#/@]")
    bad = []
    for path in ALL_COMMANDS:
        command = command_of(path)
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        bad += [(path, t) for t in texts if tag.search(t)]
    assert not bad, bad


# ---------------------------------------------------------------- a config is required


@pytest.mark.parametrize("command, example", [
    (["train"], "configs/toy-gmm.yaml"),
    (["agents", "train"], "configs/fi-toy.yaml"),
    (["flower", "run"], "configs/flower-toy.yaml"),
])
def test_a_training_command_without_a_config_is_a_usage_error_and_runs_nothing(
        tmp_path, monkeypatch, capsys, command, example):
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_main(monkeypatch, capsys, tmp_path, *command)
    assert code == 2, (out, err)
    text = flat(err)
    assert "needs a run config: --config FILE" in text and example in text, text
    assert "--set KEY=VALUE" in text and "Traceback" not in out + err
    assert files_under(tmp_path) == set()


def test_the_defaults_stay_reachable_by_set_and_printable_by_dry_run(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--dry-run"])
    assert result.exit_code == 0 and "name: run" in result.output, result.output
    # --set names what it changes on the defaults: a run, not a usage error
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), *TINY])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "model.safetensors").is_file()


# ---------------------------------------------------------------- evaluate --samples / --out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A two-step toy run and 20 samples of it drawn into a folder of their own."""
    root = tmp_path_factory.mktemp("evaluate")
    runner = CliRunner()
    run = root / "run"
    result = runner.invoke(app, ["train", "--out", str(run), *TINY],
                           env={"FEDSCORE_CACHE": str(root / "cache")})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", str(run), "--n", "20", "--out", str(root / "mix")])
    assert result.exit_code == 0, result.output
    return run, root / "mix" / "samples.npz"


def test_evaluate_with_samples_writes_beside_them_and_not_into_the_run(toy_run):
    run, samples = toy_run
    result = CliRunner().invoke(app, ["evaluate", str(run), "--samples", str(samples)])
    assert result.exit_code == 0, result.output
    written = samples.parent / EVAL
    assert json.loads(written.read_text())["samples"] == str(samples)
    assert not (run / EVAL).exists()
    assert f"eval.json: {written}" in result.output


def test_evaluate_out_puts_eval_json_in_that_folder(toy_run, tmp_path):
    run, samples = toy_run
    out = tmp_path / "scores"
    result = CliRunner().invoke(app, ["evaluate", str(run), "--samples", str(samples),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / EVAL).read_text())["n_samples"] == 20
    assert not (run / EVAL).exists()
    assert f"eval.json: {out / EVAL}" in result.output


def test_evaluate_refuses_to_overwrite_another_runs_scores(toy_run, tmp_path):
    run, samples = toy_run
    other = tmp_path / "other-run"  # a run folder of its own: config.yaml, samples, eval.json
    other.mkdir()
    shutil.copy(run / "config.yaml", other / "config.yaml")
    shutil.copy(samples, other / "samples.npz")
    (other / EVAL).write_text('{"mine": 1}')
    before = files_under(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--samples",
                                      str(other / "samples.npz")])
    assert isinstance(result.exception, FedscoreError), result.output
    message = str(result.exception)
    assert "another run's folder" in message and "--out DIR" in message
    assert (other / EVAL).read_text() == '{"mine": 1}'
    assert files_under(tmp_path) == before


def test_eval_path_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    assert eval_path(run) == run / EVAL  # the run's own samples: as before
    assert eval_path(run, run / "samples.npz") == run / EVAL  # its own, named explicitly
    assert eval_path(run, tmp_path / "x" / "s.npz") == tmp_path / "x" / EVAL
    assert eval_path(run, run / "samples.npz", tmp_path / "o") == tmp_path / "o" / EVAL
    other = tmp_path / "b"
    other.mkdir()
    (other / "config.yaml").write_text("name: b\n")
    assert eval_path(run, other / "s.npz", out=tmp_path / "o") == tmp_path / "o" / EVAL
    with pytest.raises(FedscoreError, match="another run's folder"):
        eval_path(run, other / "s.npz")


# ---------------------------------------------------------------- features train --data-root


def test_features_train_passes_data_root_to_the_extractor(monkeypatch, tmp_path):
    import fedscore.metrics

    seen = {}

    class Extractor:
        meets_floor, test_accuracy, floor = True, 0.97, 0.9

    def fake(dataset, **kw):
        seen.update(kw, dataset=dataset)
        return Extractor()

    monkeypatch.setattr(fedscore.metrics, "get_extractor", fake)
    result = CliRunner().invoke(app, ["features", "train", "--dataset", "cifar10",
                                      "--data-root", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["dataset"] == "cifar10" and Path(seen["data_root"]) == tmp_path
    assert "held-out accuracy 0.9700" in result.output


def test_features_train_with_an_empty_data_root_names_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    result = CliRunner().invoke(app, ["features", "train", "--dataset", "cifar10",
                                      "--data-root", str(empty), "--device", "cpu"])
    assert isinstance(result.exception, FedscoreError), result.output
    assert "missing: cifar-10-batches-py/data_batch_1" in str(result.exception)
    assert list(empty.iterdir()) == []


# ---------------------------------------------------------------- missing optional extras


def test_flower_simulation_without_ray_is_one_error_naming_the_extra(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_main(monkeypatch, capsys, tmp_path, "flower", "run", "--config",
                              str(CONFIGS / "flower-toy.yaml"), "--deployment", "simulation",
                              "--out", str(tmp_path / "run"))
    assert code == 2, (out, err)
    assert err.startswith("fedscore: error: ") and err.count("fedscore: error:") == 1, err
    assert "pip install 'fedscore[simulation]'" in err and "'ray'" in err
    assert "--deployment loopback" in err and "Traceback" not in out + err
    assert files_under(tmp_path) == set()


def test_a_simulation_cluster_without_ray_refuses_before_it_starts(tmp_path, monkeypatch):
    from fedscore.flower.launch import LocalFlowerCluster

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FedscoreError, match=re.escape("pip install 'fedscore[simulation]'")):
        LocalFlowerCluster(tmp_path / "home", simulation=True, sim_nodes=2)
    assert not (tmp_path / "home").exists()


# ---------------------------------------------------------------- export


def test_export_refuses_an_unknown_format_before_importing_anything(tmp_path, monkeypatch):
    # fedscore.export imports torch and diffusers: a wrong --format must not need them
    monkeypatch.setitem(sys.modules, "fedscore.export", None)
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "onnx", "--out",
                                      str(tmp_path / "out")])
    assert isinstance(result.exception, FedscoreError), result.output
    assert "unknown export format 'onnx'; choose one of: diffusers" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_export_needs_out():
    result = CliRunner().invoke(app, ["export", "runs/x"])
    assert result.exit_code == 2 and "--out" in result.output


def test_the_cli_formats_are_the_exporters():
    export = pytest.importorskip("fedscore.export")
    assert tuple(export.FORMATS) == EXPORT_FORMATS


def test_ctrl_c_in_a_run_says_what_was_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    """Typer turns Ctrl-C into a silent exit 130; main() still tells the user that the run
    kept its last checkpoint and how to continue it."""
    import fedscore.runs.train as train_module

    def interrupted(cfg, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_central", interrupted)
    code, _, err = run_main(monkeypatch, capsys, tmp_path, "train", "--config",
                            str(CONFIGS / "toy-gmm.yaml"), *TINY)
    assert code == 130
    assert "interrupted" in err and "--resume" in err
    assert "Traceback" not in err
