"""The Flower ServerApp: SPEC §2's server on Flower's Message API (`@app.main()` + Grid).

Per round q it sends theta_q and the resolved fedscore config to every connected SuperNode,
waits a bounded time for the replies, adds each sparse reply straight into eq. 8's running
sums and counts (`payload.add_to_sums`, never a dense copy of a pruned worker's model) and
finishes eq. 8 with `federated.finish` — the same function the in-process engine calls.
Then it writes the same run folder as the in-process engine: metrics.jsonl (plus replies,
failures and bytes per round), an atomic checkpoint per round, model.safetensors.

Why our own round loop rather than subclassing `flwr.serverapp.strategy.FedAvg`: the
strategy's loop knows nothing of masks, resumable checkpoints or degraded rounds, and its
`send_and_receive` polls every 3 s and drops the id of a message whose node died; pushing
and pulling here (`exchange`) keeps the message -> node map and polls faster.

Faults: a SuperNode that dies or errors mid-round is dropped from that round. Coverage and
Gamma* are computed over the replies that arrived, coordinates nobody covered keep their
value (`uncovered`), the round is logged as degraded, and the run goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedscore import federated
from fedscore.errors import FedscoreError
from fedscore.flower import payload
from fedscore.flower.records import flat_record, record_to_numpy

app = ServerApp()


@dataclass
class ServerSettings:
    """The run config keys of the Flower app (pyproject's [tool.flwr.app.config])."""

    config: str  # the resolved fedscore config, YAML text
    out: str  # the run folder, on the machine that runs the ServerApp
    resume: bool = False
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    start_wait: float = 120.0  # seconds to wait for `min_nodes` SuperNodes before round 1
    node_wait: float = 10.0  # the same wait before later rounds (a dead node may not return)
    min_nodes: int = 0  # 0: all `federation.workers`
    min_replies: int = 1  # fewer replies than this: the round changes nothing (degraded)
    poll: float = 0.5  # seconds between pulls of replies (Flower's own loop: 3 s)

    @classmethod
    def from_run_config(cls, rc: dict) -> ServerSettings:
        keys = {f: f.replace("_", "-") for f in cls.__dataclass_fields__}
        return cls(**{f: rc[k] for f, k in keys.items() if k in rc})


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, ServerSettings.from_run_config(dict(context.run_config)))


def wait_for_nodes(grid: Grid, need: int, timeout: float, poll: float) -> list[int]:
    """Node ids once `need` are connected, or whatever is connected after `timeout` s
    (Flower's own wait has no timeout)."""
    end = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() >= end:
            return nodes
        time.sleep(poll)


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float
             ) -> tuple[dict[int, Message], dict[int, str]]:
    """Push messages, pull replies until all arrived or `timeout` s passed.

    Returns (replies by node id, failures by node id: an error reply's reason, or no reply
    in time). An error the SuperLink raises for a dead node carries the SuperLink's id as
    its source, so replies are mapped back to nodes through `reply_to_message_id`."""
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    failures = {m.metadata.dst_node_id: "could not be pushed"
                for mid, m in zip(ids, messages) if not mid}
    waiting, replies = set(node_of), {}
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        for reply in grid.pull_messages(list(waiting)):
            mid = reply.metadata.reply_to_message_id
            waiting.discard(mid)
            node = node_of[mid]
            if reply.has_error():
                failures[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                replies[node] = reply
        if waiting:
            time.sleep(poll)
    failures |= {node_of[mid]: f"no reply within {timeout:g} s" for mid in waiting}
    return replies, failures


def run_server(grid: Grid, s: ServerSettings) -> Path:
    """The federated run of config `s.config` over the SuperNodes of `grid`."""
    from fedscore.runs.config import config_from_text
    from fedscore.runs.federated import (
        Federation,
        prepare,
        resume_state,
        save_final,
        save_round,
        write_partition,
    )
    from fedscore.runs.folder import RunFolder
    from fedscore.runs.train import eval_eq9, held_out_batch

    cfg = config_from_text(s.config)
    f: Federation = prepare(cfg)
    fed = f.fed
    folder = RunFolder.open(cfg, resume=s.resume, path=Path(s.out))
    params, start, gamma_star = f.init_params, 0, None
    if s.resume:
        params, _, start, gamma_star = resume_state(folder, params)
    else:
        write_partition(folder, f)
    eval_x, eval_y = held_out_batch(cfg, cfg.train.eval_batch)
    dense = sum(v.numel() * v.element_size() for v in params.values())
    need = s.min_nodes or fed.workers

    for q in range(start, fed.rounds):
        t0 = time.perf_counter()
        wait = s.start_wait if q == start else s.node_wait
        nodes = wait_for_nodes(grid, need, wait, s.poll)
        if len(nodes) < s.min_replies:
            raise FedscoreError(
                f"round {q + 1}: only {len(nodes)} SuperNode(s) connected after "
                f"{wait:g} s (need {s.min_replies}); the checkpoint of round {q} is "
                f"kept in {str(folder.checkpoint)!r}: start the SuperNodes and resume"
            )
        settings = ConfigRecord({"config": s.config, "round": q})
        model_record = flat_record(params)
        messages = [
            Message(RecordDict({"global": model_record, "settings": settings}),
                    dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(q))
            for node in nodes
        ]
        replies, failures = exchange(grid, messages, s.round_timeout, s.poll)
        t_replies = time.perf_counter() - t0

        sums = {k: torch.zeros_like(v) for k, v in params.items()}
        counts = {k: torch.zeros(v.shape, dtype=torch.long) for k, v in params.items()}
        masks, arrived, losses, up, train_s = [], [], [], [], []
        for node, reply in sorted(replies.items()):
            meta = reply.content["meta"]
            pid = int(meta["partition-id"])
            if pid in arrived:
                failures[node] = f"duplicate partition-id {pid} (ignored)"
                continue
            arrays = record_to_numpy(reply.content["payload"])
            kinds = json.loads(str(meta["kinds"]))
            regen = None
            if fed.policy == "random":  # seeded masks: regenerate, nothing was sent
                from fedscore.runs.federated import worker_masks

                regen = {k: v[0] for k, v in worker_masks(f, params, q, [pid]).items()}
            masks.append(payload.add_to_sums(sums, counts, arrays, kinds, regen))
            metrics = reply.content["metrics"]
            arrived.append(pid)
            losses.append(float(metrics["loss"]))
            train_s.append(float(metrics.get("train-seconds", float("nan"))))
            up.append(payload.nbytes(arrays))

        degraded = len(arrived) < len(nodes) or len(nodes) < fed.workers
        record = {"round": q + 1, "replies": len(arrived), "workers": sorted(arrived),
                  "missing_workers": sorted(set(range(fed.workers)) - set(arrived)),
                  "failed": {str(k): v for k, v in failures.items()}, "degraded": degraded}
        if len(arrived) >= s.min_replies:
            new, coverage = federated.finish(params, sums, counts, fed.uncovered)
            stats = federated.round_stats(params, masks, coverage)  # w^2 of theta_q
            params = new
            gamma_star = stats["min_coverage"] if gamma_star is None else min(
                gamma_star, stats["min_coverage"])
            record |= {"loss": sum(losses) / len(losses), "worker_loss": losses, **stats}
        else:
            record |= {"loss": float("nan"), "note": "too few replies: model unchanged"}
        f.model.load_state_dict(params, strict=False)
        eq9 = eval_eq9(cfg, f.model, eval_x, eval_y, f.times) if fed.eval_due(q) else None
        seconds = time.perf_counter() - t0
        record |= {
            "eq9_heldout": eq9, "gamma_star": gamma_star, "seconds": seconds,
            "seconds_replies": t_replies, "worker_train_seconds": train_s,
            "overhead_seconds": t_replies - max(train_s, default=0.0),
            "bytes_up": up, "bytes_up_total": sum(up), "bytes_down_total": dense * len(nodes),
            "bytes_dense_fedavg_up_total": dense * len(arrived),
        }
        folder.log(record)
        save_round(folder, params, q + 1, gamma_star)
        status = "DEGRADED " if degraded else ""
        print(f"[fedscore] {status}round {q + 1}/{fed.rounds}: {len(arrived)}/{len(nodes)} "
              f"replies, loss {record['loss']:.4f}"
              + (f", eq9 {eq9:.4f}" if eq9 is not None else "") + f", {seconds:.1f} s"
              + (f"; missing workers {record['missing_workers']}" if degraded else "")
              + (f"; failed: {record['failed']}" if failures else ""), flush=True)
    save_final(folder, params)
    folder.write_json("flower.json", {"rounds": fed.rounds, "gamma_star": gamma_star,
                                      "finished": True})
    return folder.path
