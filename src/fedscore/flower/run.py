"""`fedscore flower run`: one fedscore config, run on Flower on this machine.

deployment "loopback": a SuperLink and N SuperNodes as real processes on 127.0.0.1, then
`flwr run` against them; "simulation": Flower's simulation runtime (a SuperLink started with
--simulation and N virtual SuperNodes; needs Flower's simulation extra, i.e. Ray). Either way
the run folder is the in-process engine's (config.yaml, metrics.jsonl, checkpoint, model),
plus Flower's home (logs, certificates, connection config) under `<out>/flower-home`.

Devices: the workers train on the config's `device` / `precision`; on loopback `node_devices`
puts SuperNode n on its own device (node config `device`, e.g. one GPU per node); in the
simulation runtime `client_cpus` / `client_gpus` are each virtual node's Ray resources
(client_gpus 0.25: four virtual nodes share one GPU). The ServerApp stays on the CPU: it only
adds sparse replies into eq. 8's sums, a few vector operations per round.

`federation.secure_aggregation: true` runs the rounds through Flower's SecAgg+
(flower/secure_transport.py, docs/privacy.md) on either deployment; its settings are
checked here first (`secure.plan`). The in-process engine (`fedscore train`) has no secure
path: it holds every worker's update in one process.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import torch

from fedscore.config import FederationConfig, RunConfig, dump_config
from fedscore.errors import FedscoreError
from fedscore.flower import secure
from fedscore.flower.launch import (  # check_simulation_extra: also fi_run's
    LocalFlowerCluster,
    check_simulation_extra,
    tail,
)
from fedscore.flower.server_app import TOKEN_LINE, token_of

DEPLOYMENTS = ("loopback", "simulation")


def server_settings(cfg: RunConfig, out: Path, *, resume: bool = False,
                    round_timeout: float = 600.0, start_wait: float = 120.0,
                    node_wait: float = 10.0, min_replies: int = 1,
                    token: str | None = None) -> dict:
    """The run config handed to `flwr run` (keys of server_app.ServerSettings). `token`
    (default: a fresh one) is written into the run folder's state.json by the ServerApp, so
    the launcher can tell this run's result from a previous run's; it travels as a comment
    line of the config text (`server_app.TOKEN_LINE`), since Flower refuses run-config
    keys the app's pyproject does not declare."""
    text = dump_config(cfg) + f"{TOKEN_LINE}{token or uuid.uuid4().hex}\n"
    return {"config": text, "out": str(Path(out).resolve()), "resume": resume,
            "round-timeout": float(round_timeout), "start-wait": float(start_wait),
            "node-wait": float(node_wait),
            "min-replies": int(min_replies)}


def server_result(out: Path, token: str, output: str, log: Path) -> None:
    """Raise unless the ServerApp of run `token` finished: state.json must carry this
    token and state "finished" (a flower.json left by an earlier run proves nothing). The
    error carries the server's own reason (its `[fedscore] refused/failed:` log line, or
    the failed state's reason)."""
    state = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((Path(out) / "state.json").read_text())
    if isinstance(state, dict) and state.get("token") == token:
        if state.get("state") == "finished":
            return
        reason = state.get("reason") or f"it is still marked {state.get('state')!r}"
        raise FedscoreError(f"the Flower server run failed: {reason}")
    # this run's own output (the log file also holds earlier runs')
    said = [line.split("[fedscore] ", 1)[1] for line in output.splitlines()
            if "[fedscore] refused:" in line or "[fedscore] failed:" in line]
    reason = said[-1] if said else f"it ended without finishing; logs:\n{tail(log)}"
    raise FedscoreError(f"the Flower server did not run: {reason}")


def run_flower(cfg: RunConfig, out: Path, *, deployment: str = "loopback",
               nodes: int | None = None, tls: bool = False, auth: bool = False,
               resume: bool = False, round_timeout: float = 600.0, start_wait: float = 120.0,
               node_wait: float = 10.0, min_replies: int = 1, stream: bool = True,
               node_devices: dict[int, str] | None = None, client_cpus: int | None = None,
               client_gpus: float | None = None) -> Path:
    """Run cfg's federation on Flower; returns the run folder.

    node_devices: loopback only, SuperNode n -> its device ("cuda:1"; others: the config's
    `device`). client_cpus, client_gpus: simulation only, each virtual node's Flower client
    resources (num-cpus, a whole number; num-gpus, a fraction of a GPU); None: Flower's
    defaults (2 CPUs, no GPU)."""
    if not isinstance(cfg.federation, FederationConfig):
        raise FedscoreError("this config has `federation: none`; Flower runs need a "
                            "`federation:` section")
    if deployment not in DEPLOYMENTS:
        raise FedscoreError(f"unknown deployment {deployment!r}; choose one of {DEPLOYMENTS}")
    workers = cfg.federation.workers
    nodes = workers if nodes is None else nodes
    if nodes != workers:
        raise FedscoreError(f"--nodes {nodes} but the config has federation.workers = "
                            f"{workers}: one SuperNode per worker")
    simulation = deployment == "simulation"
    if node_devices and simulation:
        raise FedscoreError("per-node devices (--node-device) are for --deployment loopback; "
                            "the simulation runtime's virtual nodes share the config's "
                            "`device` (use --client-gpus to share a GPU)")
    if (client_cpus is not None or client_gpus is not None) and not simulation:
        raise FedscoreError("--client-cpus / --client-gpus are the simulation runtime's "
                            "resources; use them with --deployment simulation")
    if bad := sorted(n for n in node_devices or {} if not 0 <= n < nodes):
        raise FedscoreError(f"--node-device names node(s) {bad}, but the nodes are 0..{nodes - 1}")
    if client_gpus and not torch.cuda.is_available():
        raise FedscoreError(f"client GPUs {client_gpus} asked for, but this machine has no "
                            "CUDA device (Ray would start no virtual node); use --client-gpus 0")
    if cfg.federation.secure_aggregation:
        secure.plan(cfg)  # SecAgg+ settings it cannot run: refused before anything starts
    secure.check_privacy(cfg)  # privacy settings that would not protect what they claim
    if simulation:
        check_simulation_extra()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flower-home"
    settings = server_settings(cfg, out, resume=resume, round_timeout=round_timeout,
                               start_wait=start_wait, node_wait=node_wait,
                               min_replies=min_replies)
    with LocalFlowerCluster(home, nodes=nodes, simulation=simulation, sim_nodes=nodes,
                            tls=tls, auth=auth, devices=dict(node_devices or {}),
                            client_cpus=client_cpus, client_gpus=client_gpus) as fed:
        done = fed.run_app(settings, stream=stream)
    # the folder's state as THIS run's server left it (its token), not a previous run's
    server_result(out, token_of(settings["config"]), done.stdout or "",
                  home / "logs" / "run.log")
    return out
