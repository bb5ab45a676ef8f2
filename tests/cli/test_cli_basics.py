"""The CLI: bad input is one line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

from typer.testing import CliRunner

from fedscore.cli import app


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedscore.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_a_config_typo_is_one_clear_line_and_exit_code_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  stepz: 10\n")
    proc = run_cli("train", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.stepz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_dry_run_prints_the_resolved_config():
    result = CliRunner().invoke(app, ["train", "--dry-run", "--set", "train.steps=17"])
    assert result.exit_code == 0, result.output
    assert "steps: 17" in result.output and "grid: exponential" in result.output


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["train", "demo"]:
        assert command in result.output
