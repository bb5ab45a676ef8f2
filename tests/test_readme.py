"""README.md as a doc-test: its Python blocks run as written, and every shell command in it
is exercised — the quick ones run as written, the long ones run with a smaller budget
appended, and the few that a dedicated test already runs name that test. A command added to
the README without an entry in COMMANDS fails `test_every_readme_command_is_exercised`."""

import glob
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscore.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# What each README command gets in the test: ("run", extra arguments appended) or
# ("test", "file::name") for a command that test already runs end to end.
TINY_MNIST = ["--set", "train.steps=2", "--set", "train.eval_batch=2", "--set",
              "train.log_every=1", "--set", "sample.steps=2", "--set", "sample.n=10"]
QUICK_REPRODUCTION = ("run", ["--budget", "quick", "--dataset", "digits"])
COMMANDS: dict[str, tuple] = {
    "make demo": ("test", "tests/test_readme.py::test_make_targets_run_what_the_readme_says"),
    "make test": ("test", "tests/test_readme.py::test_make_targets_run_what_the_readme_says"),
    "fedscore demo --quick --out runs/demo-quick": (
        "test", "tests/demo/test_demo.py::test_quick_demo_writes_a_complete_report"),
    "fedscore train --config configs/toy-gmm.yaml": (
        "run", ["--set", "train.steps=30", "--set", "train.checkpoint_every=10"]),
    "fedscore train --config configs/mnist5k-central.yaml": ("run", TINY_MNIST),
    "fedscore train --config configs/toy-gmm.yaml --set train.steps=500 --dry-run": ("run", []),
    "fedscore sample runs/toy-gmm --n 2000": ("run", []),
    "fedscore evaluate runs/toy-gmm": ("run", []),
    "fedscore report runs/toy-gmm runs/mnist5k-central --out runs/compare": ("run", []),
    "fedscore features train --dataset mnist5k": ("run", []),
    # the quick budgets on the 8x8 digits (on mnist5k they alone took ~3 min of this test)
    "fedscore reproduce pruning --dataset mnist5k": QUICK_REPRODUCTION,
    "fedscore reproduce federated-inference --dataset mnist5k": QUICK_REPRODUCTION,
    "fedscore train --config configs/pruning-cifar10.yaml --set data.data_root=/data/torchvision"
    " --set federation.policy=random --set federation.level=S --set name=pruning-cifar10-R-S"
    " --dry-run": ("run", []),
    "fedscore agents train --config configs/fi-mnist.yaml --set data.data_root=/data/torchvision"
    " --regime heterogeneous --dry-run": ("run", []),
    "fedscore agents train --config configs/fi-mnist5k.yaml --regime heterogeneous": (
        "run", TINY_MNIST),
    "fedscore agents sample runs/fi-mnist5k/agent-* --aggregator mixture --out runs/fi-mixture":
        ("run", ["--per-label", "2", "--steps", "3"]),
    "fedscore evaluate runs/fi-mnist5k/agent-00 --samples runs/fi-mixture/samples.npz": (
        "run", []),
    "fedscore agents diagnose runs/fi-mnist5k/agent-* --aggregator mean": ("run", []),
    "fedscore agents train --config configs/fi-toy.yaml --regime heterogeneous --out runs/fi-toy":
        ("run", ["--set", "train.steps=2", "--agents", "2"]),
    "fedscore agents sample runs/fi-toy/agent-* --aggregator route --deployment loopback"
    " --out runs/fi-route": (
        "test", "tests/flower/test_fi_flower.py"
                "::test_route_on_loopback_supernodes_through_the_cli_is_the_in_process_route"),
    "fedscore agents sample runs/fi-toy/agent-* --aggregator mixture --deployment simulation"
    " --out runs/fi-mix": (
        "test", "tests/flower/test_fi_flower.py"
                "::test_simulation_runtime_samples_equal_the_in_process_mixture"),
    "fedscore train --config configs/flower-toy.yaml --set theory.estimate=true"
    " --set theory.every=1 --out runs/theory-toy": ("run", ["--set", "federation.rounds=2"]),
    "fedscore bound runs/theory-toy": ("run", []),
    "fedscore bound --params examples/bound-constants.yaml --out runs/bound-what-if": ("run", []),
    "fedscore data show --config configs/own-shapes.yaml": ("run", []),
    # two rounds, eq. 9 on two held-out images over a 100-point DDPM grid: seconds
    "fedscore train --config configs/own-shapes.yaml": (
        "run", ["--set", "federation.rounds=2", "--set", "train.eval_batch=2",
                "--set", "diffusion.steps=99"]),
    "fedscore export runs/own-shapes --format diffusers --out runs/own-shapes-diffusers": (
        "run", []),
    "fedscore flower run --config configs/flower-toy.yaml --deployment simulation"
    " --out runs/flower-sim": (
        "test", "tests/flower/test_flower_loopback.py"
                "::test_flower_simulation_runtime_matches_the_in_process_engine"),
    "fedscore flower run --config configs/flower-toy.yaml --deployment loopback"
    " --out runs/flower-toy": (
        "test", "tests/flower/test_flower_loopback.py"
                "::test_two_supernodes_match_the_in_process_engine"),
    "fedscore flower run --config configs/flower-toy.yaml --tls --auth --out runs/flower-secure": (
        "test", "tests/flower/test_flower_loopback.py::test_tls_and_supernode_authentication"),
    "fedscore flower app flower-app": ("run", []),
    "fedscore flower run --config configs/flower-toy.yaml --set federation.secure_aggregation=true"
    " --deployment simulation --out runs/flower-secagg": (
        "test", "tests/flower/test_secagg_flower.py::test_simulation_secure_run_equals_plain"),
    "fedscore train --config configs/flower-toy.yaml --set privacy.mode=client"
    " --set privacy.clip=0.1 --set privacy.target_epsilon=8 --out runs/dp-toy": ("run", []),
    "fedscore report runs/dp-toy --out runs/dp-report": ("run", []),
}


def readme_commands(text: str) -> list[str]:
    """Every command line of the README's bash blocks, without its trailing comment."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_every_readme_command_is_exercised():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 20, commands
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, f"README commands without a doc-test entry: {missing}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"doc-test entries for commands README no longer has: {stale}"


def test_commands_covered_elsewhere_name_a_real_test():
    for command, (kind, *rest) in COMMANDS.items():
        if kind == "test":
            path, name = rest[0].split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), (command, rest[0])


def test_make_targets_run_what_the_readme_says():
    make = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "fedscore demo" in demo  # the quick demo's test runs the same command
    test = re.search(r"^test:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "pytest" in test and "ruff check" in test
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs `make test`
    assert "@@" not in README.read_text()  # no unfilled placeholder


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    """Run every "run" command in README order in one scratch folder, so later commands
    find the run folders earlier ones wrote (runs/toy-gmm, runs/fi-mnist5k/agent-*, ...)."""
    for folder in ("configs", "examples"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in readme_commands(README.read_text()):
        kind, *rest = COMMANDS[command]
        if kind != "run":
            continue
        argv = shlex.split(command)
        assert argv[0] == "fedscore", command
        args = [a for arg in argv[1:] for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
        result = runner.invoke(app, args + rest[0])
        assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    assert (tmp_path / "runs" / "compare" / "report.md").is_file()
    assert (tmp_path / "runs" / "fi-mixture" / "samples.png").is_file()
    assert (tmp_path / "runs" / "theory-toy" / "bound.md").is_file()
    assert len(glob.glob("runs/fi-mnist5k/agent-*/model.safetensors")) == 10
    assert (tmp_path / "runs" / "own-shapes-diffusers" / "model_index.json").is_file()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["x_mix"].shape == (1000, 2)
    # the mixture sampler puts about 60% of the samples on client 0's side (x < 0)
    left = float((namespace["x_mix"][:, 0] < 0).float().mean())
    assert abs(left - 0.6) < 0.05
