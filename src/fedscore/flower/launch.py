"""Starting and stopping a Flower federation on this machine, and running our app on it.

`LocalFlowerCluster` starts `flower-superlink` (simulation runtime, or a deployment SuperLink plus N
`flower-supernode` processes) on free loopback ports under its own FLWR_HOME, writes the
connection into that home's config.toml, and stops every process it started by its PID
(its whole process group: Flower's SuperLink and SuperNodes spawn their apps as children)
on exit, error, Ctrl-C or SIGTERM (turned into Ctrl-C's KeyboardInterrupt). If our process
dies without stopping them (SIGKILL), a parent-death signal and a watchdog stop them
(`reaper`). `run_app` runs `flwr run` against it with the run config of
`server_app.ServerSettings` and reports the run's final status from the SuperLink. Nothing
here knows about diffusion models.

Each SuperLink keeps its state in memory (Flower's `:flwr-in-memory:` database): fedscore's
own state is in the run folder, and a SuperLink database reused across launches (the old
`flower-home/superlink.db`) listed the previous launch's dead SuperNodes, so a `--resume`d
run waited for them and logged its first round as degraded.

Settings that matter on a small CPU (measured on this project's 2-core machine):
  - runtime dependency installation is disabled: by default the SuperLink `uv sync`s the
    app's dependencies, i.e. downloads torch, every run;
  - OMP_NUM_THREADS=1 in every process: N SuperNodes each spawning a ClientApp with as many
    threads as cores made a 0.45 s local step take 13.8 s;
  - every SuperNode gets its own `--port` (its runtime API), all on 127.0.0.1;
  - telemetry and update checks are off (no network).

Devices: a deployment SuperNode trains where its node config's `device` says (`devices`, one
per node, e.g. {0: "cuda:0", 1: "cuda:1"}; else the run config's `device`). The simulation
runtime's virtual SuperNodes are Ray actors: `client_cpus` / `client_gpus` are Flower's
backend client resources (`client-resources` num-cpus / num-gpus), what Ray reserves for
each running ClientApp; num-gpus 0.25 lets four virtual nodes share one GPU at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedscore.errors import FedscoreError, require
from fedscore.flower import reaper
from fedscore.flower.security import TLSFiles, make_node_key, make_tls

CONNECTION = "fedscore"
IN_MEMORY_DATABASE = ":flwr-in-memory:"  # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # handled as Ctrl-C while a federation runs


def check_simulation_extra() -> None:
    """Flower's simulation runtime runs its virtual SuperNodes as Ray actors: without Ray
    the SuperLink starts and then fails inside a subprocess, so say it before anything
    starts, as one FedscoreError naming the extra that installs it."""
    try:
        require("ray", "simulation", "Flower's simulation runtime (--deployment simulation)")
    except FedscoreError as err:
        raise FedscoreError(f"{err} (or use --deployment loopback, which needs nothing more)"
                            ) from None


def app_pyproject(name: str, description: str, module: str, config: str) -> str:
    """The pyproject.toml of a Flower app whose ServerApp and ClientApp are
    `fedscore.flower.<module>_server_app:app` / `<module>_client_app:app` (module "" for
    federated training's), declaring the run config keys `config` (TOML lines; Flower
    refuses keys the app does not declare)."""
    prefix = f"{module}_" if module else ""
    return f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "{description}"
license = "MIT"
dependencies = ["fedscore"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedscore"

[tool.flwr.app.components]
serverapp = "fedscore.flower.{prefix}server_app:app"
clientapp = "fedscore.flower.{prefix}client_app:app"

[tool.flwr.app.config]
{config}"""


APP_PYPROJECT = app_pyproject(
    "fedscore-flower", "fedscore's federated score-model training (pruned workers, eqs. 7-8)",
    "", """\
config = ""
out = ""
resume = false
round-timeout = 600.0
start-wait = 120.0
node-wait = 10.0
min-nodes = 0
min-replies = 1
poll = 0.5
""")


def write_app(folder: Path, pyproject: str | None = None) -> Path:
    """The Flower app folder `flwr run` packages: only a pyproject.toml whose components
    point at the installed fedscore package (the FAB then carries no code of ours).
    pyproject: another app's (its own components and run config keys, e.g. federated
    inference's `fi_run.FI_PYPROJECT`); default: federated training's."""
    folder.mkdir(parents=True, exist_ok=True)
    # the module's APP_PYPROJECT read at call time, not bound as a default when defined
    (folder / "pyproject.toml").write_text(APP_PYPROJECT if pyproject is None else pyproject)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "\n" in text:  # literal multi-line string: YAML never holds three single quotes
        return "'''\n" + text + "'''"
    return _toml_str(text)


def write_run_config(path: Path, values: dict) -> Path:
    """A TOML file of run-config overrides for `flwr run --run-config <file>`."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def _bin(name: str) -> str:
    """An executable of the Flower installed next to this interpreter."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FedscoreError(f"{name!r} not found: install Flower (pip install flwr)")
    return found


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FedscoreError(
                f"{Path(proc.args[0]).name} exited with code {proc.returncode} while "
                f"starting; its log: {log}\n{tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise FedscoreError(f"{Path(proc.args[0]).name} did not open port {port} within "
                        f"{timeout:g} s; its log: {log}")


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalFlowerCluster:
    """A SuperLink (and SuperNodes) on loopback under `home`; a context manager.

    nodes: SuperNodes to start (deployment); 0 with simulation=True uses Flower's simulation
    runtime with `sim_nodes` virtual SuperNodes. tls: serve the SuperLink over TLS with a
    fresh test CA; auth: SuperNode authentication, each node's key registered with
    `flwr supernode register` before it starts. devices: node n -> the device its worker
    trains on (node config `device`; deployment only). client_cpus, client_gpus: each
    virtual node's resources in the simulation runtime (None: Flower's defaults, 2 CPUs and
    no GPU); see `simulation_config`."""

    home: Path
    nodes: int = 2
    simulation: bool = False
    sim_nodes: int = 2
    tls: bool = False
    auth: bool = False
    node_config: dict[int, dict] = field(default_factory=dict)  # extra per node
    devices: dict[int, str] = field(default_factory=dict)  # node -> node config `device`
    client_cpus: int | None = None
    client_gpus: float | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    certs: TLSFiles | None = None
    launch_id: str = field(default_factory=reaper.new_launch_id)  # marks all our processes
    watchdog: reaper.Watchdog | None = None
    _handlers: dict[int, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.home = Path(self.home).resolve()
        if self.auth and not self.tls:
            raise FedscoreError("SuperNode authentication needs TLS (tls=True)")
        if self.simulation and self.devices:
            raise FedscoreError(
                "per-node devices are for deployment SuperNodes; the simulation runtime's "
                "virtual nodes train on the run config's `device`, sharing GPUs by "
                "client_gpus")
        if not self.simulation and (self.client_cpus is not None
                                    or self.client_gpus is not None):
            raise FedscoreError("client resources (num-cpus, num-gpus) are the simulation "
                                "runtime's; a deployment SuperNode uses its whole machine")
        self.simulation_config()  # checks the resources before anything starts
        if self.simulation:
            check_simulation_extra()

    # -- environment -------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # Flower default: 1 s
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a warning of Ray
            reaper.LAUNCH_ENV: self.launch_id,  # inherited by everything Flower starts
            # the SuperLink and SuperNodes start Flower's other executables by name
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        })
        if self.simulation and self.client_gpus is not None and float(self.client_gpus) == 0:
            # num-gpus 0 asked for: Ray hides the GPUs from the virtual nodes (they train on
            # the CPU); otherwise it leaves them visible to actors that reserved none
            env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as out:
            # own process group: stop() signals the process and every child it spawned, and
            # a Ctrl-C in the terminal reaches only us (we stop them in order)
            proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_pdeathsig())
        self.processes[name] = proc
        return proc

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> LocalFlowerCluster:
        self._catch_stop_signals()
        try:
            self.start()
        except BaseException:
            self.stop()
            self._restore_signals()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._restore_signals()

    def _catch_stop_signals(self) -> None:
        """SIGTERM (and SIGHUP) become a KeyboardInterrupt while the federation runs, so
        `kill <pid>` stops it as Ctrl-C does: __exit__ stops every process, the CLI exits 130.
        Only from the main thread (Python's rule) and only over the default handler: a
        handler someone else installed is theirs."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                self._handlers[sig] = signal.signal(sig, _interrupt)

    def _restore_signals(self) -> None:
        while self._handlers:
            sig, old = self._handlers.popitem()
            signal.signal(sig, old)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if reaper.supported() and self.watchdog is None:
            self.watchdog = reaper.Watchdog(self.launch_id)  # before the first process
        if self.tls:
            self.certs = make_tls(self.home / "certs")
        self.port = free_port()
        self.write_connection()
        cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation",
               "--database", IN_MEMORY_DATABASE]
        if self.simulation:
            cmd.append("--simulation")
        cmd += self._tls_args() if self.tls else ["--insecure"]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        _wait_port(self.port, self._spawn("superlink", cmd), self.log("superlink"))
        if not self.simulation:
            for n in range(self.nodes):
                self.start_node(n)

    def _tls_args(self) -> list[str]:
        c = self.certs
        return ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key)]

    def write_connection(self) -> Path:
        """$FLWR_HOME/config.toml with one connection, CONNECTION, made the default."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "",
                 f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        if self.tls:
            lines.append(f"root-certificates = {_toml_str(str(self.certs.ca_cert))}")
        else:
            lines.append("insecure = true")
        path = self.home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def node_args(self, n: int, key: Path | None = None) -> list[str]:
        """The flower-supernode command of worker n (public so tests can start rogues)."""
        cfg = {"partition-id": n, "num-partitions": self.nodes} | self.node_config.get(n, {})
        if n in self.devices:
            cfg["device"] = str(self.devices[n])
        conf = " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())
        cmd = [_bin("flower-supernode"), "--superlink", self.address,
               "--port", str(free_port()), "--node-config", conf]
        cmd += ["--root-certificates", str(self.certs.ca_cert)] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return cmd

    def start_node(self, n: int, register: bool = True) -> subprocess.Popen:
        key = None
        if self.auth:
            key, pub = make_node_key(self.home / "keys", f"node{n}")
            if register:
                self.flwr(["supernode", "register", str(pub), CONNECTION])
        return self._spawn(f"supernode{n}", self.node_args(n, key))

    def flwr(self, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this federation; raises with its output on failure."""
        done = subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout, cwd=self.home)
        if done.returncode != 0:
            raise FedscoreError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}):\n"
                                f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def kill_node(self, n: int) -> None:
        """Kill SuperNode n and everything it started by PID, at once (a crash, for fault
        tests)."""
        proc = self.processes.get(f"supernode{n}")
        if proc is not None:
            _kill_tree([proc], signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this federation started, and their descendants, by PID:
        SIGTERM, up to 10 s to exit, then SIGKILL; then (Linux) every process that still
        carries this launch's marker, wherever it was re-parented; then the watchdog."""
        self._stop_processes()
        if reaper.supported():
            reaper.reap(self.launch_id)
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def _stop_processes(self) -> None:
        procs = list(self.processes.values())
        pids = _kill_tree(procs, signal.SIGTERM)
        end = time.monotonic() + 10
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, end - time.monotonic()))
        while time.monotonic() < end and any(_alive(p) for p in pids):
            time.sleep(0.2)
        _kill_tree(procs, signal.SIGKILL, also=pids)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def simulation_config(self) -> dict[str, int | float]:
        """`flwr run --federation-config` of the simulation runtime (flwr 1.42: the fields
        of its SimulationConfig, dashed): the number of virtual SuperNodes and, when given,
        each one's client resources. Ray runs at most min(CPUs / num-cpus, GPUs / num-gpus)
        virtual nodes at once; a fractional num-gpus packs several on one GPU (Ray only
        accounts for it: the ClientApps must fit in the GPU's memory together)."""
        conf: dict[str, int | float] = {"num-supernodes": int(self.sim_nodes)}
        if self.client_cpus is not None:
            if int(self.client_cpus) != self.client_cpus or self.client_cpus < 1:
                raise FedscoreError(f"client CPUs must be a whole number >= 1 (Flower's "
                                    f"num-cpus), got {self.client_cpus}")
            conf["client-resources-num-cpus"] = int(self.client_cpus)
        if self.client_gpus is not None:
            gpus = float(self.client_gpus)
            if not gpus >= 0 or (gpus > 1 and not gpus.is_integer()):
                raise FedscoreError(f"client GPUs must be a fraction of one GPU per virtual "
                                    f"node (0 to 1, e.g. 0.25) or a whole number of GPUs, "
                                    f"got {self.client_gpus}")
            conf["client-resources-num-gpus"] = gpus
        return conf

    # -- running the app ---------------------------------------------------------------
    def run_app(self, settings: dict, *, timeout: float | None = None,
                stream: bool = False, check: bool = False,
                pyproject: str | None = None) -> FlowerRun:
        """`flwr run <app> fedscore --run-config <settings> --stream`: returns when the run
        has ended (the ServerApp's log is streamed into logs/run.log), with the run's final
        status on the SuperLink (`flwr run` exits 0 even when the ServerApp failed).
        check: raise FedscoreError unless the run finished:completed. pyproject: the app
        to run (`write_app`; default: federated training's)."""
        app = write_app(self.home / "app", pyproject)
        overrides = write_run_config(self.home / "run-config.toml", settings)
        cmd = [_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(overrides),
               "--stream"]
        if self.simulation:
            conf = " ".join(f"{k}={v}" for k, v in self.simulation_config().items())
            cmd += ["--federation-config", conf]
        self.log("run").parent.mkdir(parents=True, exist_ok=True)
        with open(self.log("run"), "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=self.home,
                                    start_new_session=True, preexec_fn=_pdeathsig())
            self.processes["flwr-run"] = proc
            lines = []
            try:
                for raw in proc.stdout:
                    out.write(raw)
                    out.flush()
                    lines.append(raw.decode(errors="replace"))
                    if stream:
                        sys.stdout.write(lines[-1])
                        sys.stdout.flush()
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                raise FedscoreError(f"flwr run did not finish within {timeout:g} s") from None
        text = "".join(lines)
        run_id = _run_id(text)
        status, details = self.run_status(run_id) if run_id is not None else (None, "")
        done = FlowerRun(cmd, proc.returncode, text, "", run_id=run_id, status=status,
                         details=details, log=self.log("run"))
        if check:
            done.check()
        return done

    def run_status(self, run_id: int, wait: float = 15.0) -> tuple[str | None, str]:
        """(status, details) of run `run_id` from `flwr ls --run-id <id> --format json`,
        e.g. ("finished:failed", "..."): polled until it is `finished:*` (the log stream can
        end a moment before the SuperLink records the final status) or `wait` passes.
        (None, why) if the SuperLink cannot be asked."""
        end = time.monotonic() + wait
        while True:
            try:
                done = self.flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format",
                                  "json"], timeout=60)
                (row,) = json.loads(done.stdout)["runs"]
            except (FedscoreError, ValueError, KeyError, TypeError,
                    subprocess.TimeoutExpired) as err:
                return None, f"`flwr ls` could not tell the run's status: {err}"
            status, details = str(row.get("status", "")), str(row.get("status-details", ""))
            if status.startswith("finished") or time.monotonic() > end:
                return status, details
            time.sleep(0.5)


class FlowerRun(subprocess.CompletedProcess):
    """`flwr run`'s process result plus what the SuperLink says of the run: `status` is
    Flower's status text ("finished:completed", "finished:failed", "finished:stopped"; None
    if unknown) and `details` its status details."""

    def __init__(self, args, returncode, stdout, stderr, *, run_id: int | None,
                 status: str | None, details: str, log: Path):
        super().__init__(args, returncode, stdout, stderr)
        self.run_id, self.status, self.details, self.log = run_id, status, details, log

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"

    def check(self) -> None:
        """Raise one FedscoreError naming what failed, with the tail of the run's log."""
        if self.ok:
            return
        if self.run_id is None:
            what = f"`flwr run` started no run (exit {self.returncode})"
        else:
            what = (f"Flower run {self.run_id} ended {self.status or 'with an unknown status'}"
                    f" (flwr run exit {self.returncode})")
        if self.details not in ("", "N/A"):  # the ServerApp's exception, in one line
            raise FedscoreError(f"{what}: {self.details}; its log: {self.log}")
        raise FedscoreError(f"{what}; its log: {self.log}\n{tail(self.log)}")


def _run_id(text: str) -> int | None:
    """The run id in `flwr run`'s output ("Successfully started run 123")."""
    found = re.search(r"started run (\d+)", text)
    return int(found.group(1)) if found else None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _pdeathsig():
    """The parent-death preexec_fn (reaper.die_with_parent) when we run on the main thread:
    the signal follows the thread that started the process, and tests start processes from
    worker threads that end long before the federation does."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return reaper.die_with_parent()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pids: list[int]) -> set[int]:
    """Every process below `pids`. Flower's SuperLink and SuperNodes start their SuperExec
    detached (a new session), so signalling a process group would miss them: we walk the
    tree and signal each PID."""
    tree, seen, todo = _children(), set(), list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_tree(procs: list[subprocess.Popen], sig: int, also: set[int] = frozenset()
               ) -> set[int]:
    """Signal every process of `procs`, their groups and their descendants; the pids hit."""
    pids = descendants([p.pid for p in procs]) | set(also)
    for proc in procs:
        _signal_group(proc, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids | {p.pid for p in procs}
