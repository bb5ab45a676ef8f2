"""Federated inference's ClientApp: one SuperNode is one agent of SPEC §3, and its weights
never leave it.

The SuperNode holds its agent's run folder (what `fedscore agents train` wrote): node config
`agent-dir=/path/to/agent-run-folder` on a deployment SuperNode; in Flower's simulation
runtime, whose virtual nodes have no node config of ours, the run config's `agent-dirs` (a
JSON list) indexed by the node's `partition-id`. `partition-id` is also the agent's place in
the server's order (the order of `fedscore agents sample RUN_DIR...`).

Two messages (`fi_server_app` sends them):
  query.describe  -> the agent's resolved config (model, data, diffusion, sampling grid) and
                     its class_counts.json: the metadata the server needs to drive the
                     sampler and to weigh the agents, nothing of the network's weights;
  query.score     x (B, ...) float32, forward times t (B,), labels y (B,) ->
                     this agent's score s_i(x, t | y), (B, ...) float32: the one forward
                     pass of `StackedAgents` with K = 1, on the node's device
                     (`runtime.for_run`: node config `device`, else the run config's);
  query.route     seed, labels y (B,), the grid, the sampler and this agent's rows ->
                     those rows' samples: `route`'s one message per silo. The silo runs
                     THE sampling code (`inference.sampling.draw`: the prior noise of that
                     seed, the unchanged sampler, the full batch) with a score function
                     that is this agent's on its rows and zero elsewhere; the other rows
                     are other agents' business and their values are dropped. A row's
                     trajectory depends only on its own score and noise, and the noise is
                     drawn for the full batch, so its rows are the in-process route's.
The agent is loaded once per process (`loaded`); a deployment SuperNode of flwr 1.42 starts
a fresh ClientApp process per message, so there it is loaded per step (see docs/flower.md,
"Federated inference on Flower", for what that costs).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedscore import data as datasets
from fedscore.config import dump_config
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import agents_runtime, load_agents
from fedscore.experiments.diffusers_agents import is_diffusers_folder, signature
from fedscore.flower.client_app import process_age
from fedscore.inference.agents import StackedAgents
from fedscore.inference.sampling import draw
from fedscore.runs.sampling import on_device
from fedscore.runtime import Runtime

app = ClientApp()


def agent_of(node_config: dict, run_config: dict) -> tuple[int, Path]:
    """(this node's agent index, its agent's run folder) from the node config's
    `partition-id` and `agent-dir`, or the run config's `agent-dirs[partition-id]`."""
    if "partition-id" not in node_config:
        raise FedscoreError("this SuperNode has no `partition-id` in its node config; start "
                            "it with --node-config 'partition-id=<i> agent-dir=<folder>'")
    pid = int(node_config["partition-id"])
    if node_config.get("agent-dir"):
        return pid, Path(str(node_config["agent-dir"]))
    dirs = json.loads(str(run_config.get("agent-dirs") or "[]"))
    if not 0 <= pid < len(dirs):
        raise FedscoreError(f"SuperNode partition-id={pid} has no agent: its node config "
                            "names no `agent-dir` and the run config's agent-dirs has "
                            f"{len(dirs)} entries")
    return pid, Path(dirs[pid])


_LOADED: dict[tuple, tuple[StackedAgents, Runtime]] = {}
MAX_LOADED = 64


def loaded(folder: Path, device: str | None, precision: str | None
           ) -> tuple[StackedAgents, Runtime]:
    """The agent of `folder` (load_agents with K = 1, as `sample_agents` loads it in-process)
    and where it runs, kept for the next messages of this process: the simulation runtime
    may serve several virtual nodes, i.e. several agents, from one process. A retrained
    agent (a newer model file) is loaded afresh."""
    model = folder / "model.safetensors"
    key = (str(folder.resolve()), device, precision,
           model.stat().st_mtime_ns if model.is_file() else None)
    if key not in _LOADED:
        runtime = agents_runtime([folder], device, precision)
        if len(_LOADED) >= MAX_LOADED:  # a long-lived process: forget older runs' agents
            _LOADED.clear()
        _LOADED[key] = (load_agents([folder], device=runtime.device), runtime)
    return _LOADED[key]


def _where(context: Context) -> tuple[int, Path, str | None, str | None]:
    node, run = dict(context.node_config), dict(context.run_config)
    pid, folder = agent_of(node, run)
    device = str(node.get("device") or run.get("device") or "") or None
    precision = str(run.get("precision") or "") or None
    return pid, folder, device, precision


def _naming_the_agent(handler):
    """A handler whose failure names this node's agent: Flower sends the exception's text to
    the server as the reply's error, and the server's error should say which agent broke."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            node = dict(context.node_config)
            who = f"agent {node.get('partition-id', '?')}"
            if node.get("agent-dir"):
                who += f" ({Path(str(node['agent-dir'])).name})"
            raise FedscoreError(f"{who}: {' '.join(str(err).split())[:500]}") from err

    return wrapped


@app.query("describe")
@_naming_the_agent
def describe(msg: Message, context: Context) -> Message:
    """The agent's metadata: its index, folder name, resolved config (a diffusers folder's
    synthesised one), class counts, and its `signature` (architecture, item shape, labels,
    time map: what the server checks the agents share, nothing of the weights' values). The
    agent is loaded here, so a broken folder fails before the first step."""
    pid, folder, device, precision = _where(context)
    agents, runtime = loaded(folder, device, precision)
    cfg = agents.config
    return Message(RecordDict({"agent": ConfigRecord({
        "agent": pid, "name": folder.name, "config": dump_config(cfg),
        "class-counts": json.dumps(agents.counts[0].tolist()),
        "signature": json.dumps(signature(agents.model, cfg)),
        "diffusers": is_diffusers_folder(folder),
        "device": runtime.describe()["device"]})}), reply_to=msg)


def _array(record: ArrayRecord, key: str, dtype: str) -> torch.Tensor:
    arr = record[key].numpy()
    if arr.dtype != np.dtype(dtype):
        raise FedscoreError(f"the server sent {key} as {arr.dtype}, expected {dtype}")
    return torch.from_numpy(np.array(arr))


@app.query("score")
@_naming_the_agent
def score(msg: Message, context: Context) -> Message:
    """s_i(x, t | y) of this node's agent, (B, ...) float32 on the CPU."""
    startup = process_age()
    pid, folder, device, precision = _where(context)
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    inputs = msg.content["inputs"]
    x, t = _array(inputs, "x", "float32"), _array(inputs, "t", "float32")
    y = _array(inputs, "y", "int64") if "y" in inputs else None
    if t.shape != (x.shape[0],) or (y is not None and y.shape != t.shape):
        raise FedscoreError(f"x {tuple(x.shape)}, t {tuple(t.shape)} and labels do not fit")
    t0 = time.perf_counter()
    agents, runtime = loaded(folder, device, precision)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = on_device(agents, runtime)(x, t, y)[0].to("cpu", torch.float32).contiguous()
    seconds = time.perf_counter() - t0
    call = int(msg.content["call"]["call"])
    return Message(RecordDict({
        "scores": ArrayRecord({"score": Array(s.numpy())}),
        "call": ConfigRecord({"agent": pid, "call": call}),
        "metrics": MetricRecord({"score-seconds": seconds, "load-seconds": load_s,
                                 "process-age-seconds": startup}),
    }), reply_to=msg)


@app.query("route")
@_naming_the_agent
def route(msg: Message, context: Context) -> Message:
    """`route` on this silo: its rows of the batch sampled by its agent alone, (n, ...)
    float32, with the rows echoed (the server checks them)."""
    startup = process_age()
    pid, folder, device, precision = _where(context)
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    inputs, meta = msg.content["inputs"], msg.content["call"]
    y, rows = _array(inputs, "y", "int64"), _array(inputs, "rows", "int64")
    times = _array(inputs, "times", "float64")
    if y.ndim != 1 or rows.ndim != 1 or times.ndim != 1:
        raise FedscoreError("the server sent labels, rows or times that are not 1-D")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(y) or len(rows.unique()) < len(rows)):
        raise FedscoreError(f"the server sent rows outside 0..{len(y) - 1} or repeated")
    agents, runtime = loaded(folder, device, precision)
    own = on_device(agents, runtime)
    shape = datasets.shape_and_classes(agents.config)[0]  # the agents' config sizes them

    def on_own_rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(x)
        s[rows] = own(x[rows], t[rows], y[rows])[0].to(x.dtype)
        return s

    t0 = time.perf_counter()
    x = draw(on_own_rows, len(y), shape, times, str(meta["method"]), int(meta["seed"]))
    seconds = time.perf_counter() - t0
    return Message(RecordDict({
        "samples": ArrayRecord({"x": Array(x[rows].contiguous().numpy()),
                                "rows": Array(rows.numpy())}),
        "call": ConfigRecord({"agent": pid, "call": int(meta["call"])}),
        "metrics": MetricRecord({"score-seconds": seconds, "process-age-seconds": startup}),
    }), reply_to=msg)
