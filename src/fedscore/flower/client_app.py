"""The Flower ClientApp: one SuperNode is one worker of SPEC §2.

Flower's Message API (`@app.train()`), not the deprecated NumPyClient path. The worker
learns who it is from Flower's node config (`partition-id`, `num-partitions`, what Flower's
simulation engine sets and what `flower-supernode --node-config` passes), receives theta_q
and the run's resolved fedscore config from the server, runs `federated.setup.worker_round`
(eq. 7, the same function the in-process engine's sequential path runs) and answers with a
sparse payload: its kept values and its mask (`flower.payload`).

The worker's setup (its data, partition, model, loss) is prepared once per run and kept
(`prepared`): a round costs the local steps plus transport. Flower's simulation runtime keeps
a ClientApp's process between messages, so there the setup is built once per run; a
deployment SuperNode (flwr 1.42) starts a fresh `flwr-clientapp` process per message, where
what is left per round is the process start itself (Python, torch), measured in
benchmarks/flower_overhead.py.

A hospital's SuperNode can instead train on its own data, read only on that node, with no
partitioning: node config `data-path=/its/images` (an image folder or an .npz file, format by
what it is; `fedscore.data.own`) is read with the run config's data options and made to the
model's shape (`silo_source`), and its training split is this worker's data; or
`data-root=/its/data` reads the run's built-in dataset from there (its training split).
The server never reads either: it sizes the model from the config alone.

Device: each SuperNode trains where its own node config says (`device='cuda:1'`), else where
the run config's `device` says ("auto": CUDA when the node has it, else its CPU), in the run
config's `precision` (`runtime.resolve`, `node_runtime`). A device the node lacks is one
FedscoreError naming the node and the devices it has: Flower logs it in that node's log and
sends it to the server as the reply's error, and the server drops the reply as it does any
failed one. Whatever the device, the reply is CPU float32 arrays (the kept values of the
float32 master weights; `payload.encode`).

Flower starts a fresh ClientApp process per message, so anything a worker keeps between
rounds (Adam's moments when `federation.adam_state: keep`) lives in `context.state`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedscore import data as datasets
from fedscore import privacy
from fedscore import runtime as runtimes
from fedscore.config import OWN_DATA, RunConfig, config_from_text
from fedscore.data import own
from fedscore.errors import FedscoreError
from fedscore.federated import state_from_tensors, state_to_tensors
from fedscore.federated.setup import FederationSetup, prepare, worker_round
from fedscore.flower import payload, secure
from fedscore.flower.records import flat_record, from_flat_record


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a secure round (those that carry
    SecAgg+'s config record: its four stages), the plain path for the others; so one
    ClientApp serves both kinds of run."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation_mod])


def node_identity(node_config: dict, workers: int) -> int:
    """This node's worker id, checked against the run's number of workers."""
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no `partition-id` in its node config; start it with "
            "--node-config 'partition-id=<n> num-partitions=<N>'"
        )
    pid = int(node_config["partition-id"])
    total = int(node_config.get("num-partitions", workers))
    if total != workers or not 0 <= pid < workers:
        raise ValueError(
            f"node config says partition {pid} of {total}, but the run has {workers} workers"
        )
    return pid


def silo_source(cfg: RunConfig, path: str):
    """The DataConfig of a SuperNode's own `data-path`: a folder (name folder) or an .npz
    file (name arrays), read with the run config's options (channels, image_size, classes,
    hflip, held-out fraction and seed) and made to the model's shape
    (`data.shape_and_classes(cfg)`: the config's, not this silo's). The shape must be a
    square image's (C, S, S); anything else cannot be made from images."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FedscoreError(f"this SuperNode's data-path {str(p)!r} does not exist")
    d = cfg.data
    if d.name in OWN_DATA and d.path is None and (d.image_size is None or d.channels is None):
        raise FedscoreError(
            "a run over the silos' own images sizes its model from the run config: set "
            "data.image_size and data.channels (and model.num_classes for a class-conditional "
            "model), which the server and every SuperNode share")
    shape, _ = datasets.shape_and_classes(cfg)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise FedscoreError(
            f"this SuperNode's data-path holds images, but the run's model takes items of "
            f"shape {tuple(shape)}; run it with image data (data.name: folder, "
            f"data.image_size and data.channels set)")
    return cfg.data.model_copy(update={
        "name": "folder" if p.is_dir() else "arrays", "path": str(p), "test_path": None,
        "data_root": None, "download": False, "channels": shape[0], "image_size": shape[1],
    })


def _own_data(cfg: RunConfig, node_config: dict):
    """(images, labels) this SuperNode holds itself, or None (the run's dataset, partitioned):
    `data-path` (a folder or .npz of the user's own images, the training split of it) or
    `data-root` (the run's built-in dataset read from a local folder)."""
    path, root = node_config.get("data-path"), node_config.get("data-root")
    if path:
        source = silo_source(cfg, str(path))
        if cfg.model.conditional and source.name == "folder" and cfg.data.classes is None:
            _check_numbered(source)
        return datasets.load(source, split="train")
    if not root:
        return None
    return datasets.load(cfg.data.model_copy(update={"data_root": str(root)}), split="train")


def _check_numbered(source) -> None:
    """A conditional silo's class folders must number their classes as every other silo:
    integer names, or data.classes in the run config. Sorted names would number a silo
    that lacks a class differently from the others, silently."""
    names = sorted(own.list_folder(Path(source.path), None)[1])
    if names and not all(n.isdigit() for n in names):
        raise FedscoreError(
            f"this SuperNode's folder {source.path!r} names its classes {names}; a class-"
            "conditional run over silos must number the classes alike on every silo: set "
            "data.classes in the run config to all class names in label order (or name the "
            "folders 0, 1, ...)")


def node_runtime(cfg: RunConfig, node_config: dict) -> runtimes.Runtime:
    """Where this SuperNode trains: its node config's `device` if it names one, else the run
    config's `device`, in the run config's `precision`. A device this node lacks is a
    FedscoreError that names the node, the setting it came from and the devices it has."""
    device = node_config.get("device") or cfg.device
    source = "node config" if node_config.get("device") else "run config"
    try:
        return runtimes.resolve(str(device), cfg.precision)
    except FedscoreError as err:
        raise on_node(node_config, f"cannot train on the {source}'s device {str(device)!r}: "
                                   f"{err}") from None


def on_node(node_config: dict, message: str) -> FedscoreError:
    """An error of this SuperNode, naming it: Flower sends the text to the server, whose
    failure log then says which node failed and why."""
    return FedscoreError(f"SuperNode partition-id={node_config.get('partition-id', '?')}: "
                         f"{message}")


_PREPARED: dict[tuple, FederationSetup] = {}


def prepared(config_text: str, node_config: dict) -> FederationSetup:
    """This worker's setup for the run whose resolved config is `config_text`, built on the
    first message of the run and kept for the next ones. Kept: the setups of one run (the
    simulation runtime may serve several virtual nodes from one process)."""
    key = (config_text, tuple(sorted((str(k), str(v)) for k, v in node_config.items())))
    if key not in _PREPARED:
        if any(k[0] != config_text for k in _PREPARED):  # a new run: forget the old one
            _PREPARED.clear()
        cfg = config_from_text(config_text)
        rt = node_runtime(cfg, node_config)  # before any data is loaded
        try:
            _PREPARED[key] = prepare(cfg, own_data=_own_data(cfg, node_config), runtime=rt)
        except FedscoreError as err:
            raise on_node(node_config, str(err)) from None
    return _PREPARED[key]


def process_age() -> float:
    """Seconds since this process started (Linux /proc; NaN elsewhere): at the start of a
    message, what starting the ClientApp process cost (interpreter, imports)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "fitins.config" in msg.content.config_records:  # SecAgg+'s masked-vector stage
        return secure_train(msg, context)
    startup = process_age()
    settings = msg.content["settings"]
    node_config = dict(context.node_config)
    torch.set_num_threads(int(node_config.get("threads", 1)))
    t_prep = time.perf_counter()
    f = prepared(str(settings["config"]), node_config)
    prep_seconds = time.perf_counter() - t_prep
    cfg = f.cfg
    if cfg.federation.secure_aggregation or node_config.get("require-secagg"):
        # a server asking a secure run's worker for its plain update is refused
        raise FedscoreError(
            "this worker answers only through SecAgg+ (the run config's "
            "federation.secure_aggregation, or the node config's require-secagg), but the "
            "server asked for a plain update; refused")
    q = int(settings["round"])
    pid = node_identity(node_config, cfg.federation.workers)
    params = from_flat_record(msg.content["global"], f.init_params)
    theta, mask, losses, seconds = _local_round(f, params, q, pid, context)

    seeded = cfg.federation.policy == "random"  # the server regenerates random masks
    arrays, kinds = payload.encode(theta, mask, seeded=seeded)
    kept = sum(int(m.sum()) for m in mask.values())  # payload arrays are CPU float32 already
    content = RecordDict({
        "payload": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "meta": ConfigRecord({"partition-id": pid, "round": q, "kinds": json.dumps(kinds)}),
        "metrics": MetricRecord({
            "loss": float(losses.mean()), "kept": kept, "num-examples": len(f.parts[pid]),
            "payload-bytes": payload.nbytes(arrays), "train-seconds": seconds,
            "process-age-seconds": startup, "prepare-seconds": prep_seconds,
        } | own_epsilon(f, q, pid)),
        "runtime": ConfigRecord(f.runtime.describe()),
    })
    return Message(content=content, reply_to=msg)


def own_epsilon(f: FederationSetup, q: int, pid: int) -> dict:
    """privacy mode sample: this worker's epsilon after round q (its DP-SGD ran here, on
    data only it knows the size of), reported to the server; {} otherwise."""
    plan = f.privacy
    if plan is None or plan.mode != "sample":
        return {}
    return {"epsilon": float(plan.worker_epsilons(q + 1)[pid])}


def _local_round(f: FederationSetup, params: dict, q: int, pid: int, context: Context):
    """Eq. 7 of worker `pid` from theta_q (`worker_round`), with its Adam moments kept in
    the node's context state when the run keeps them: (theta, mask, losses, seconds)."""
    keep = f.cfg.federation.adam_state == "keep"
    opt_state = _load_state(context.state, f.init_params) if (
        keep and "adam-m" in context.state) else None
    t0 = time.perf_counter()
    theta, mask, state, losses = worker_round(f, params, q, pid, opt_state)
    seconds = time.perf_counter() - t0
    if state and keep:
        _store_state(context.state, state, f.init_params)
    return theta, mask, losses, seconds


def secure_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's COLLECT_MASKED_VECTORS stage, inside `secaggplus_mod`: theta_q and
    the settings arrive as a legacy fit instruction; the worker runs the same eq. 7 and
    answers its dense [s·θ⊙m, m, s·loss] (`secure.secure_vectors`) as a fit result with
    num_examples 1, which the mod quantises and masks before it leaves the node. Only the
    metrics (partition id, round, timings, device) travel in the clear."""
    startup = process_age()
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    node_config = dict(context.node_config)
    torch.set_num_threads(int(node_config.get("threads", 1)))
    f = prepared(str(fitins.config["config"]), node_config)
    fed = f.cfg.federation
    if not fed.secure_aggregation:
        raise FedscoreError("a SecAgg+ round for a run whose config has "
                            "federation.secure_aggregation false; refused")
    q = int(fitins.config["round"])
    pid = node_identity(node_config, fed.workers)
    arrays = parameters_to_ndarrays(fitins.parameters)
    like = f.init_params
    if len(arrays) != len(like) or any(
            a.shape != tuple(v.shape) for a, v in zip(arrays, like.values())):
        raise FedscoreError(f"theta_q arrived as {len(arrays)} arrays that do not fit this "
                            "run's model; refused")
    params = {k: torch.from_numpy(a.copy()).to(v.device, v.dtype)
              for (k, v), a in zip(like.items(), arrays)}
    theta, mask, losses, seconds = _local_round(f, params, q, pid, context)
    noise, plan = None, f.privacy
    if plan is not None and plan.clips_updates:  # DP-FedAvg: the worker clips its update,
        # since under SecAgg+ nobody else ever sees it; and adds its share of the noise
        theta, _ = privacy.clip_update(theta, params, mask, plan.clip)
        if plan.noise == "distributed":
            noise = privacy.dense_noise(plan, q, pid, theta)
    try:
        vectors = secure.secure_vectors(theta, mask, float(losses.mean()), fed.secagg, noise)
    except FedscoreError as err:
        raise FedscoreError(f"SuperNode partition-id={pid}, round {q + 1}: {err}") from None
    device = "/".join(str(v) for v in f.runtime.describe().values())
    metrics = {"partition-id": pid, "round": q, "train-seconds": seconds,
               "process-age-seconds": startup, "device": device} | own_epsilon(f, q, pid)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vectors), 1, metrics)
    return Message(content=compat.fitres_to_recorddict(fitres, False), reply_to=msg)


def _store_state(store: RecordDict, state: dict, like: dict[str, torch.Tensor]) -> None:
    """This worker's Adam moments, kept in the SuperNode's context between rounds (named
    by parameter through `federated.state_to_tensors`, the records' format unchanged)."""
    named = state_to_tensors(state, like)
    for key in ("m", "v"):
        store[f"adam-{key}"] = flat_record({k: named[f"{key}/{k}"] for k in like})
    store["adam-step"] = ConfigRecord({"step": int(state["step"])})


def _load_state(store: RecordDict, like: dict[str, torch.Tensor]) -> dict:
    device = next(iter(like.values())).device
    named = {"step": torch.tensor(int(store["adam-step"]["step"]), device=device)}
    for key in ("m", "v"):
        named |= {f"{key}/{k}": v for k, v in from_flat_record(store[f"adam-{key}"], like).items()}
    return state_from_tensors(named, like)
