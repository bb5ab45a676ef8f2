"""`fedscore agents sample --deployment loopback | simulation`: federated inference on Flower,
on this machine.

Each agent is a SuperNode holding its own run folder or diffusers folder: on "loopback" a
SuperLink and K real `flower-supernode` processes on 127.0.0.1, node i started with node
config `partition-id=i agent-dir=FOLDER_i`; on "simulation" Flower's simulation runtime with
K virtual SuperNodes (Ray), which learn their folder from the run config's `agent-dirs` by
partition-id. The ServerApp (`fi_server_app`) drives the sampler and writes samples.npz and
samples.png into `out`, as the in-process `sample_agents` does; Flower's home (logs) is
`out/flower-home`. "inprocess" is `experiments.agents.sample_agents` itself. Per-step
aggregators exchange one round of messages per step; `route` one message per silo in all.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

from fedscore.errors import FedscoreError, unknown
from fedscore.experiments.agents import check_sampling, sample_agents
from fedscore.experiments.diffusers_agents import agent_config, is_diffusers_folder
from fedscore.flower.launch import LocalFlowerCluster, app_pyproject, tail
from fedscore.inference.agents import read_class_counts
from fedscore.runs.evaluate import FIGURE, SAMPLES, read_config

DEPLOYMENTS = ("inprocess", "loopback", "simulation")
STATUS = "flower-fi.json"
"""The server's record in `out`: this launch's token, finished/failed (and why), per-call
timings. (Flower itself is imported only for the Flower deployments.)"""
FI_PYPROJECT = app_pyproject(
    "fedscore-flower-fi",
    "fedscore's federated inference: agents on their silos, scores combined per step",
    "fi", """\
agents = 1
out = ""
aggregator = "mixture"
per-label = 10
steps = 100
seed = 0
token = ""
agent-dirs = ""
device = ""
precision = ""
start-wait = 120.0
step-timeout = 600.0
poll = 0.02
""")
"""The FI app's pyproject (`launch.write_app`): its components and run config keys
(`fi_server_app.FISettings`; Flower refuses keys the app does not declare)."""


def fi_settings(run_dirs: list[Path], out: Path, *, aggregator: str, per_label: int,
                steps: int, seed: int, device: str | None, precision: str | None,
                start_wait: float, step_timeout: float, simulation: bool, token: str) -> dict:
    """The run config handed to `flwr run` (keys of fi_server_app.FISettings). The agents'
    folders travel in it only for the simulation runtime, whose virtual nodes have no node
    config of ours; deployment SuperNodes get theirs in their own node config."""
    return {"agents": len(run_dirs), "out": str(out), "aggregator": aggregator,
            "per-label": int(per_label), "steps": int(steps), "seed": int(seed),
            "token": token,
            "agent-dirs": json.dumps([str(d) for d in run_dirs]) if simulation else "",
            "device": device or "", "precision": precision or "",
            "start-wait": float(start_wait), "step-timeout": float(step_timeout)}


def check_agents(run_dirs: list[Path]) -> None:
    """Clear errors on this machine before any process starts: each folder an agent's (a
    run folder, or a diffusers pipeline or unet folder: its config must describe an agent;
    its weights are read on its SuperNode)."""
    if not run_dirs:
        raise FedscoreError("name at least one agent run folder")
    for d in run_dirs:
        if is_diffusers_folder(d):
            agent_config(d)
            continue
        read_config(d)
        read_class_counts(d)
        if not (d / "model.safetensors").is_file():
            raise FedscoreError(f"{str(d)!r} holds no trained model (model.safetensors); "
                                "finish `fedscore agents train` first")


def sample_agents_on(run_dirs, out: str | Path, *, deployment: str = "inprocess",
                     aggregator: str = "mixture", per_label: int = 10, steps: int = 100,
                     seed: int = 0, device: str | None = None, precision: str | None = None,
                     start_wait: float = 120.0, step_timeout: float = 600.0,
                     stream: bool = False, client_cpus: int | None = None) -> dict[str, Path]:
    """`sample_agents` in-process, or on Flower with each agent on its own SuperNode; the
    same samples for the same seed. Returns {"samples": samples.npz, "figure": samples.png}.
    client_cpus: each virtual node's CPUs in the simulation runtime (None: Flower's 2)."""
    if deployment not in DEPLOYMENTS:
        raise unknown("deployment", deployment, DEPLOYMENTS)
    if deployment == "inprocess":
        return sample_agents(run_dirs, out, aggregator=aggregator, per_label=per_label,
                             steps=steps, seed=seed, device=device, precision=precision)
    check_sampling(aggregator, per_label, steps)
    dirs = [Path(d).resolve() for d in run_dirs]
    check_agents(dirs)
    simulation = deployment == "simulation"
    if simulation:
        from fedscore.flower.run import check_simulation_extra  # imports flwr: Flower only

        check_simulation_extra()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home, token = out / "flower-home", uuid.uuid4().hex
    settings = fi_settings(dirs, out, aggregator=aggregator, per_label=per_label, steps=steps,
                           seed=seed, device=device, precision=precision,
                           start_wait=start_wait, step_timeout=step_timeout,
                           simulation=simulation, token=token)
    nodes = {i: {"agent-dir": str(d)} for i, d in enumerate(dirs)}
    with LocalFlowerCluster(home, nodes=len(dirs), simulation=simulation,
                            sim_nodes=len(dirs), node_config=nodes,
                            client_cpus=client_cpus if simulation else None) as fed:
        done = fed.run_app(settings, stream=stream, pyproject=FI_PYPROJECT)
    fi_result(out, token, done.stdout or "", home / "logs" / "run.log")
    return {"samples": out / SAMPLES, "figure": out / FIGURE}


def fi_result(out: Path, token: str, output: str, log: Path) -> dict:
    """The server's STATUS of run `token`, or one FedscoreError with the server's reason
    (its STATUS, else its `[fedscore] failed:` log line, else the log's tail)."""
    status = {}
    with contextlib.suppress(OSError, ValueError):
        status = json.loads((out / STATUS).read_text())
    if isinstance(status, dict) and status.get("token") == token:
        if status.get("state") == "finished":
            return status
        raise FedscoreError(f"federated inference on Flower failed: {status.get('reason')}")
    said = [line.split("[fedscore] failed: ", 1)[1] for line in output.splitlines()
            if "[fedscore] failed: " in line]
    reason = said[-1] if said else f"it ended without finishing; logs:\n{tail(log)}"
    raise FedscoreError(f"the Flower server did not sample: {reason}")
