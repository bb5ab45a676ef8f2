"""The Flower launcher leaves nothing running and reports the server's result (issue 16,
item 5), with real processes: `fedscore flower run` on loopback (a SuperLink, 2 SuperNodes,
their SuperExecs and apps) killed by SIGKILL, SIGTERM or SIGINT, then resumed.

Every process a test starts carries FEDSCORE_TEST_MARK=<uuid> in its environment (children
inherit it, whatever session Flower puts them in): the assertion "nothing is left" scans
/proc for it, and the `mark` fixture SIGKILLs whatever still has it when a test ends, pass or
fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.flower import reaper
from fedscore.flower.launch import FlowerRun, LocalFlowerCluster
from fedscore.flower.run import server_settings
from run_records import records

pytestmark = [
    pytest.mark.skipif(not reaper.supported(), reason="the reaper needs Linux /proc"),
    pytest.mark.timeout(600),
]

ROOT = Path(__file__).resolve().parents[2]
MARK = "FEDSCORE_TEST_MARK"
# configs/flower-toy.yaml cut to 2 workers (4 of the ring's 8 classes each), 1 local step
SETS = ["federation.workers=2", "federation.partition.classes_per_worker=4",
        "federation.local_steps=1", "model.options.hidden=16", "train.eval_batch=32"]


@pytest.fixture
def mark(monkeypatch):
    """A fresh marker in our environment (so in every process started from here); whatever
    still carries it at the end is killed."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARK, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield value
    for pid in reaper.marked(value, MARK):
        os.kill(pid, signal.SIGKILL)


def commands(mark: str) -> list[str]:
    """The command lines of the marked processes."""
    found = []
    for pid in reaper.marked(mark, MARK):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def left_over(mark: str, within: float) -> dict[int, bytes]:
    """The marked processes still running after up to `within` seconds (zombies, dead but
    not yet waited for by their parent, do not count)."""
    end = time.monotonic() + within
    while (pids := reaper._living(reaper.marked(mark, MARK))) and time.monotonic() < end:
        time.sleep(0.2)
    return {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            for pid in pids if Path(f"/proc/{pid}/cmdline").exists()}



def start_cli(out: Path, rounds: int, *extra: str) -> subprocess.Popen:
    """`fedscore flower run` on loopback as its own process (stdout and stderr to a file)."""
    sets = [a for s in [*SETS, f"federation.rounds={rounds}"] for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with open(out.parent / f"{out.name}.cli.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedscore.cli", "flower", "run", "--config",
             str(ROOT / "configs" / "flower-toy.yaml"), *sets, "--out", str(out), *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the CLI's process before exec: SIGINT back to its default. An ignored signal is
    inherited across exec, and a test suite started in the background by a non-interactive
    shell (`make test &`, nohup) runs with SIGINT ignored: the CLI would never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_apps(cli: subprocess.Popen, mark: str, timeout: float = 240.0) -> None:
    """Until the whole tree runs: the SuperLink's SuperExec has started the ServerApp and
    both SuperNodes' SuperExecs a ClientApp (round 1 is being trained)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        running = commands(mark)
        if (sum("flwr-clientapp" in c for c in running) >= 2
                and any("flwr-serverapp" in c for c in running)):
            return
        assert cli.poll() is None, f"the CLI exited with {cli.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"no ClientApps within {timeout:g} s")


def wait_for_round_1(cli: subprocess.Popen, out: Path, timeout: float = 240.0) -> None:
    """Until round 1 is logged: the SuperLink, both SuperNodes, their SuperExecs and the
    ServerApp then run, and the nodes' ClientApps come and go with round 2."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text():
            return
        assert cli.poll() is None, (out.parent / f"{out.name}.cli.log").read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"no round within {timeout:g} s")


def test_the_watchdog_reaps_a_killed_parents_processes(mark, tmp_path):
    """Layer 3 alone: a parent starts the watchdog and a marked child in a session of its own
    (out of reach of process-group signals, with no parent-death signal), then is SIGKILLed:
    the watchdog sees its pipe close and kills the child."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from fedscore.flower import reaper
        dog = reaper.Watchdog("{mark}-launch")
        env = dict(os.environ, **{{reaper.LAUNCH_ENV: "{mark}-launch"}})
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env,
                         start_new_session=True)
        print("ready", flush=True)
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert parent.stdout.readline().strip() == b"ready"
    assert len(reaper.marked(f"{mark}-launch")) == 1  # the sleeper (not the watchdog)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    assert left_over(mark, within=20) == {}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_nothing_outlives_a_killed_or_interrupted_cli(mark, tmp_path, sig):
    """SIGKILL (nothing of ours runs: the parent-death signal kills the SuperLink, SuperNodes
    and `flwr run`, the watchdog the rest) or SIGINT (Ctrl-C: stopped in order) to
    `fedscore flower run` while its ClientApps train round 1: within 20 s no process it
    started remains, the SuperExecs and the Flower apps they started included."""
    out = tmp_path / "run"
    cli = start_cli(out, rounds=20)
    wait_for_apps(cli, mark)
    # the CLI, watchdog, SuperLink, 2 SuperNodes, 3 SuperExecs, flwr run, 3 apps
    assert len(commands(mark)) >= 12
    cli.send_signal(sig)
    code = cli.wait(timeout=60)
    assert left_over(mark, within=20) == {}
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)


@pytest.mark.slow
def test_terminate_then_resume_counts_no_dead_nodes_and_a_refused_run_is_reported(
        mark, tmp_path):
    """SIGTERM after round 1 stops every process as Ctrl-C does (exit 130). Resuming on a new
    SuperLink under the same Flower home runs round 2 with both nodes, not degraded (a
    SuperLink database kept across launches listed the 2 dead nodes of the first launch).
    A run the ServerApp refuses (the folder is finished, no --resume) ends `finished:failed`
    with the server's reason, and check() raises it."""
    out = tmp_path / "run"
    cli = start_cli(out, rounds=2)
    wait_for_round_1(cli, out)
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=60) == 130
    assert left_over(mark, within=20) == {}
    assert [r["round"] for r in records(out)] == [1]  # round 2 (seconds) was cut short

    cfg = load_config(ROOT / "configs" / "flower-toy.yaml", [*SETS, "federation.rounds=2"],
                      out_dir=str(tmp_path), name="run")
    with LocalFlowerCluster(out / "flower-home", nodes=2) as fed:
        resumed = fed.run_app(server_settings(cfg, out, resume=True, round_timeout=120),
                              timeout=300, check=True)
        refused = fed.run_app(server_settings(cfg, out, round_timeout=120), timeout=300)
    assert resumed.ok and resumed.status == "finished:completed"
    logged = records(out)
    assert [r["round"] for r in logged] == [1, 2]
    assert logged[1]["replies"] == 2 and logged[1]["missing_workers"] == []
    assert not logged[1]["degraded"]

    assert not refused.ok and refused.status == "finished:failed"
    assert "holds a finished run" in refused.details
    with pytest.raises(FedscoreError, match=f"run {refused.run_id} ended finished:failed"):
        refused.check()
    assert left_over(mark, within=20) == {}


def test_a_run_that_started_nothing_is_reported(tmp_path):
    """`flwr run` that never printed a run id (e.g. it could not reach the SuperLink): one
    message with the log's tail."""
    log = tmp_path / "run.log"
    log.write_text("Connection refused\n")
    done = FlowerRun(["flwr", "run"], 1, "", "", run_id=None, status=None, details="", log=log)
    assert not done.ok
    with pytest.raises(FedscoreError, match=r"(?s)started no run \(exit 1\).*Connection refused"):
        done.check()
