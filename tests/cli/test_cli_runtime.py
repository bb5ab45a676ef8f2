"""--device and --precision on the commands that train, sample or evaluate: resolved once
from the config (or the flags, which override it), recorded resolved in the run folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedscore import runtime
from fedscore.cli import app
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.io import read_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["--set", "train.steps=2", "--set", "train.log_every=1", "--set",
        "train.checkpoint_every=2", "--set", "train.batch_size=16", "--set",
        "train.eval_batch=16", "--set", "diffusion.steps=5", "--set", "sample.steps=2",
        "--set", "model.options={hidden: 16, depth: 1}"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedscore.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_a_missing_device_is_one_line_naming_the_devices_and_no_run_folder(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("train", "--config", str(CONFIGS / "mnist5k-central.yaml"), "--device",
                   "cuda", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fedscore: error: device 'cuda' is not available here; "
                                   "this machine has: " + ", ".join(runtime.available_devices()))
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_precision_is_a_clean_exit_2(tmp_path):
    proc = run_cli("train", "--precision", "fp8", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'fp8')" in (
        proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [
    ["agents", "train"], ["flower", "run"], ["demo"], ["reproduce", "pruning"],
    ["reproduce", "federated-inference"], ["experiment", "run", "demo"],
])
def test_every_command_refuses_an_unknown_precision_before_any_work(tmp_path, command):
    # in-process: main() turns the FedscoreError into one line and exit code 2
    result = CliRunner().invoke(app, [*command, "--precision", "fp8", "--out",
                                      str(tmp_path / "x")])
    assert isinstance(result.exception, FedscoreError), result.output
    assert "precision" in str(result.exception) and "'fp8'" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_bf16_trains_on_the_cpu_and_the_run_folder_records_the_resolved_runtime(tmp_path):
    """The toy config says device auto and precision fp32; --precision bf16 overrides it.
    config.yaml and env.json hold the resolved values, and a --resume from the same config
    (still `auto` in the file) continues the run."""
    out = tmp_path / "bf16"
    args = ["train", "--config", str(CONFIGS / "toy-gmm.yaml"), "--out", str(out), *TINY,
            "--precision", "bf16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = yaml.safe_load((out / "config.yaml").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert (stored["device"], stored["precision"]) == (expected, "bf16")
    env = json.loads((out / "env.json").read_text())
    assert env["runtime"]["device"] == expected and env["runtime"]["precision"] == "bf16"
    assert env["runtime"]["device_name"]
    assert load_config(out / "config.yaml").precision == "bf16"  # the stored config loads

    result = CliRunner().invoke(app, [*args, "--set", "train.steps=3", "--resume"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_sample_and_evaluate_take_the_runtime_flags(tmp_path):
    out = tmp_path / "toy"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(CONFIGS / "toy-gmm.yaml"), "--out",
                                 str(out), *TINY, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", str(out), "--n", "50", "--device", "cpu",
                                 "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    bf16 = np.load(out / "samples.npz")["samples"]
    assert bf16.dtype == np.float32 and bf16.shape == (50, 2) and np.isfinite(bf16).all()
    result = runner.invoke(app, ["evaluate", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "eval.json").read_text())
    # the run's own precision (fp32) unless --precision says otherwise
    assert scores["runtime"] == {"device": "cpu", "precision": "fp32"}
    result = runner.invoke(app, ["sample", str(out), "--n", "50", "--precision", "fp8"])
    assert result.exit_code != 0 and "unknown precision 'fp8'" in str(result.exception)


def test_a_preset_honours_device_and_precision_flags_over_its_config(tmp_path, monkeypatch):
    """`demo`, `reproduce ...` and `experiment run` put --device/--precision over the
    preset's shared config; the runner resolves one runtime from it."""
    import fedscore.experiments as experiments
    from fedscore.experiments.preset import load_preset
    from fedscore.experiments.runner import preset_runtime

    seen = []
    monkeypatch.setattr(experiments, "run_experiment",
                        lambda preset, out, **kw: seen.append((preset, kw)) or _stop())
    for args in (["demo", "--quick"], ["reproduce", "pruning", "--budget", "quick"],
                 ["experiment", "run", "federated-inference", "--budget", "quick"]):
        result = CliRunner().invoke(app, [*args, "--device", "cpu", "--precision", "fp32",
                                          "--out", str(tmp_path)])
        assert isinstance(result.exception, _Stopped), result.output
    for name, kw in seen:
        assert kw["overrides"] == {"config": {"device": "cpu", "precision": "fp32"}}
        preset = load_preset(name, budget=kw["budget"], overrides=kw["overrides"])
        assert preset_runtime(preset) == runtime.Runtime(torch.device("cpu"), "fp32")
        for cell in preset.cells:
            if preset.cells[cell].kind != "real":
                cfg = preset.cell_config(cell, tmp_path)
                assert (cfg.device, cfg.precision) == ("cpu", "fp32")

    # a preset's own config: {device:, precision:} is what the runner resolves
    raw = yaml.safe_load((Path(experiments.__file__).parent / "presets" / "demo.yaml")
                         .read_text())
    raw["config"] |= {"device": "cpu", "precision": "bf16"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert preset_runtime(load_preset(path, budget="quick")).precision == "bf16"
    flagged = load_preset(path, budget="quick", overrides={"config": {"precision": "fp32"}})
    assert preset_runtime(flagged).precision == "fp32"


class _Stopped(Exception):
    pass


def _stop():
    raise _Stopped


def test_auto_resolves_to_cuda_and_bf16_only_where_they_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert runtime.resolve() == runtime.Runtime(torch.device("cpu"), "fp32")
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: device.type == "cpu")
    assert runtime.resolve("auto", "auto").precision == "bf16"
    assert runtime.resolve("cpu", "fp32").precision == "fp32"  # a named precision is kept

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: device.type == "cuda")
    auto = runtime.resolve()
    assert (auto.device.type, auto.precision) == ("cuda", "bf16")

    cfg = load_config(CONFIGS / "toy-gmm.yaml")  # device auto, precision fp32
    pinned = runtime.pinned(cfg, runtime.from_config(cfg))
    assert (pinned.device, pinned.precision) == ("cuda", "fp32")
    # a finished run is used on this machine's device, in the run's precision by default
    assert runtime.for_run(pinned.model_copy(update={"precision": "bf16"})).precision == "bf16"
    assert runtime.for_run(pinned, precision="fp16").precision == "fp16"


def test_every_shipped_config_names_its_device_and_precision():
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        toy = raw["data"]["name"].startswith("gmm:")
        assert raw["device"] == "auto", path.name
        assert raw["precision"] == ("fp32" if toy else "auto"), path.name


def test_flower_run_checks_its_device_and_resource_options_before_starting_anything(tmp_path):
    from fedscore.cli import app

    # in-process the FedscoreError is the result's exception (main() makes it exit code 2)
    runner = CliRunner()
    base = ["flower", "run", "--config", "configs/flower-toy.yaml", "--out", str(tmp_path / "f")]
    bad = runner.invoke(app, [*base, "--node-device", "cuda"])
    assert isinstance(bad.exception, FedscoreError)
    assert "must look like N=DEVICE" in str(bad.exception)
    if not torch.cuda.is_available():
        gpus = runner.invoke(app, [*base, "--deployment", "simulation", "--client-gpus", "0.5"])
        assert isinstance(gpus.exception, FedscoreError)
        assert "no CUDA device" in str(gpus.exception)
    assert not (tmp_path / "f").exists()
