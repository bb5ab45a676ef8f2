"""Bad values and paths at the CLI's edge (issue 16 items 6 and the "Names" bullet): each is
one `fedscore: error:` line naming the field, exit code 2, no traceback, and nothing written
anywhere (a run name never escapes its output folder; --out may be any folder)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedscore
from cli_harness import run_main

SRC = str(Path(fedscore.__file__).resolve().parents[1])  # this checkout's code, from any folder


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}




@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder three levels deep (so '../../x' would still land in tmp_path, where
    it is seen) and a cache of its own."""
    cwd = tmp_path / "a" / "b" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    return tmp_path, cwd


BAD = [
    # (--set overrides or other arguments, words the message must hold)
    (["--set", "name=../../x"], ["name:", "'../../x'", "--out"]),
    (["--set", "name=/tmp/escaped-run"], ["name:", "'/tmp/escaped-run'"]),
    (["--set", "name="], ["name:", "empty"]),
    (["--set", "name=.."], ["name:", "'..'"]),
    (["--set", "name=a/b"], ["name:", "'a/b'"]),
    (["--set", "train.steps=true"], ["train.steps", "not a boolean"]),
    (["--set", "federation.workers=false"], ["federation.workers", "not a boolean"]),
    (["--set", "diffusion.T=.inf"], ["diffusion.T", "finite"]),
    (["--set", "train.lr=.inf"], ["train.lr", "finite"]),
    (["--set", "train.lr=.nan"], ["train.lr", "finite"]),
    (["--set", "train.lr=0"], ["train.lr", "greater than 0"]),
    (["--set", "train.steps=-3"], ["train.steps", "greater than or equal to 1"]),
    (["--set", "train.steps=ten"], ["train.steps", "'ten'"]),
    (["--set", "seed=-1"], ["seed", "greater than or equal to 0"]),
    (["--set", "seed=99999999999999999999999"], ["seed", "less than or equal to"]),
    (["--set", "train.stepz=3"], ["train.stepz", "unknown key"]),
    (["--set", "train.steps"], ["train.steps", "key.sub=value"]),
    (["--out", "runs/my run"], ["--out", "'my run'"]),
    (["--out", "/"], ["--out", "''"]),
    (["--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    (["--set", "train.steps=1", "--set", "train.steps.x=1"], ["train.steps", "no keys"]),
]


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_or_path_is_one_message_naming_it_and_nothing_is_written(
        sandbox, monkeypatch, capsys, args, words):
    root, cwd = sandbox
    before = files_under(root)
    code, out, err = run_main(monkeypatch, capsys, cwd, "train", *args)
    assert code == 2, (out, err)
    assert err.startswith("fedscore: error: ") and err.count("fedscore: error:") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in out + err
    assert files_under(root) == before


def test_bad_yaml_in_a_config_file_is_one_message(sandbox, monkeypatch, capsys):
    root, cwd = sandbox
    (cwd / "bad.yaml").write_text("train: {steps: [1, 2\n")
    before = files_under(root)
    code, _, err = run_main(monkeypatch, capsys, cwd, "train", "--config", "bad.yaml")
    assert code == 2 and "is not valid YAML" in err and "Traceback" not in err
    assert files_under(root) == before


def test_a_binary_config_file_is_one_message(sandbox, monkeypatch, capsys):
    root, cwd = sandbox
    (cwd / "c.yaml").write_bytes(bytes(range(256)))
    code, _, err = run_main(monkeypatch, capsys, cwd, "train", "--config", "c.yaml")
    assert code == 2 and "not a UTF-8 text file" in err and "Traceback" not in err


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_a_sampling_seed_out_of_range_is_a_usage_error(sandbox, monkeypatch, capsys, seed):
    root, cwd = sandbox
    code, _, err = run_main(monkeypatch, capsys, cwd, "sample", ".", "--seed", seed)
    assert code == 2 and "--seed" in err and "Traceback" not in err


def test_out_may_climb_out_but_the_run_lands_exactly_there_and_nowhere_else(
        sandbox, monkeypatch, capsys):
    # --out x/../../y is ../y: the folder y beside cwd, and no stray empty x/ inside cwd
    root, cwd = sandbox
    code, out, err = run_main(monkeypatch, capsys, cwd, "train", "--out", "x/../../y",
                              "--set", "train.steps=1", "--set", "train.eval_batch=4",
                              "--set", "model.options={hidden: 8, depth: 1}")
    assert code == 0, err
    made = files_under(root) - {"a", "a/b", "a/b/cwd"}
    assert {p for p in made if not p.startswith("cache")} == {
        "a/b/y", *(f"a/b/y/{f}" for f in os.listdir(root / "a" / "b" / "y"))}
    assert (root / "a" / "b" / "y" / "model.safetensors").is_file()
    assert "run folder: ../y" in out


def test_the_installed_entry_point_prints_no_traceback_for_a_bad_value(tmp_path):
    # end to end, in a fresh interpreter: what a user's shell sees
    proc = subprocess.run(
        [sys.executable, "-m", "fedscore.cli", "train", "--set", "diffusion.T=.inf"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "FEDSCORE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": SRC})
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedscore: error: ") and "diffusion.T" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
