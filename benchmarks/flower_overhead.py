"""What Flower costs: the same 3 federated rounds in-process, on Flower's simulation runtime
and on a loopback deployment (a SuperLink + N SuperNodes as real processes).

Setting (issue 7): N = 4 workers, the `tiny` U-Net (class-conditional), mnist5k, top-k masks
at level S, S = 2 local Adam steps at batch 16, 3 rounds, seed 0. Every engine runs the same
eq. 7 / eq. 8 code, so the difference is the engine.

Per engine: wall time of the whole run (process start-up included), and per round the
server's time from sending theta_q to holding every reply ("round s"), the slowest worker's
own training time as the worker measured it ("slowest worker s") and their difference, the
OVERHEAD: process start (Flower starts a fresh ClientApp process per message, which
re-imports torch; each reply reports its process's age when fedscore's code starts, the
"ClientApp process start" column), polling for replies, (de)serialisation. A ClientApp
keeps its prepared setup (data, partition, model) for the run where its process lives on
(the simulation runtime). The loopback deployment runs
twice: with fedscore's reply polling (every 0.5 s) and with Flower's own default (3 s, what
`Grid.send_and_receive` uses). Peak memory is the largest sum of resident set sizes over the
process tree (sampled every 0.2 s from /proc), in-process: the process's own peak.

Bytes per round (all workers): what the workers sent (kept values + packed mask bits for
top-k; for random masks only the values, the server regenerates the mask from its seed)
against dense FedAvg (every worker sends the full model); the bound the issue sets is
dense x (pruned fraction - 1/32 for bit masks).

Usage: python benchmarks/flower_overhead.py [--rounds 3] [--workers 4] [--out DIR]
Prints markdown tables (paste into BENCHMARKS.md) and writes DIR/flower_overhead.json.
Everything runs with one thread per process (OMP_NUM_THREADS=1), as the SuperNodes do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from fedscore.config import load_config  # noqa: E402
from fedscore.federated import build_masks, level_ratios  # noqa: E402
from fedscore.federated.setup import prepare  # noqa: E402
from fedscore.flower import payload  # noqa: E402
from fedscore.flower.launch import LocalFlowerCluster, descendants  # noqa: E402
from fedscore.flower.run import server_settings  # noqa: E402
from fedscore.runs.federated import train_federated  # noqa: E402


def config(out: Path, name: str, workers: int, rounds: int, policy: str = "topk"):
    return load_config(**{
        "name": name, "out_dir": str(out), "seed": 0, "data": {"name": "mnist5k"},
        "model": {"kind": "unet", "size": "tiny", "conditional": True},
        "diffusion": {"steps": 50}, "train": {"eval_batch": 32},
        "federation": {"workers": workers, "rounds": rounds, "local_steps": 2,
                       "batch_size": 16, "lr": 2e-3, "policy": policy, "level": "S",
                       "strategy": "sequential"},
    })


class TreeMemory:
    """Peak summed RSS (MB) of some processes and all their descendants (Flower starts its
    SuperExec detached, in a new session, so the tree is walked, not a process group),
    sampled every 0.2 s in a thread."""

    def __init__(self, roots):
        self.roots, self.peak, self._stop = roots, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def _sample(self) -> float:
        roots = list(self.roots())
        total = 0
        for pid in descendants(roots) | set(roots):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss pages
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def summarise(name: str, wall: float, records: list[dict], peak_mb: float) -> dict:
    rounds = [r.get("seconds_replies", r["seconds"]) for r in records]
    slowest = [max(r.get("worker_train_seconds") or [float("nan")]) for r in records]
    over = [a - b for a, b in zip(rounds, slowest)]
    # seconds from a ClientApp process's start to its first line of fedscore code, the mean
    # over the round's workers (a deployment SuperNode starts one process per message)
    startup = [sum(s) / len(s) if s else float("nan")
               for s in (r.get("worker_startup_seconds") or [] for r in records)]
    return {"engine": name, "wall_s": wall, "round_s": rounds, "slowest_worker_s": slowest,
            "overhead_s": over, "clientapp_start_s": startup, "peak_mb": peak_mb,
            "bytes_up": [r.get("bytes_up_total") for r in records],
            "bytes_dense": [r.get("bytes_dense_fedavg_up_total") for r in records]}


def run_in_process(out: Path, workers: int, rounds: int) -> dict:
    cfg = config(out, "inprocess", workers, rounds)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    result = train_federated(cfg, progress=False)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in result.folder.metrics_path.read_text().splitlines()]
    peak = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # the in-process engine trains all workers in one call: its "slowest worker" is the
    # whole round's training, so its overhead is the round's eval + aggregation time
    for r in records:
        r["worker_train_seconds"] = [r["seconds"]]
    return summarise("in-process", wall, records, peak)


def run_flower(out: Path, name: str, workers: int, rounds: int, *, simulation: bool,
               poll: float) -> dict:
    cfg = config(out, name, workers, rounds)
    folder = out / name
    home = Path(tempfile.mkdtemp(prefix=f"flwr-{name}-"))
    settings = server_settings(cfg, folder) | {"poll": poll}
    t0 = time.perf_counter()
    with LocalFlowerCluster(home, nodes=workers, simulation=simulation, sim_nodes=workers) as fed:
        with TreeMemory(lambda: [p.pid for p in fed.processes.values()]) as mem:
            done = fed.run_app(settings, timeout=1800)
    wall = time.perf_counter() - t0
    if not (folder / "flower.json").is_file():
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}")
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return summarise(name, wall, records, mem.peak)


def payload_bytes(workers: int) -> list[dict]:
    """Bytes one round's workers send at level S: dense, top-k (bits), random (seeded)."""
    cfg = config(Path(tempfile.mkdtemp()), "bytes", workers, 1)
    f = prepare(cfg)
    params = f.init_params
    dense = sum(v.numel() * v.element_size() for v in params.values())
    ratios = level_ratios("S", n_workers=workers)
    rows = []
    for policy, seeded in (("topk", False), ("random", True)):
        gens = [torch.Generator().manual_seed(n) for n in range(workers)]
        masks = build_masks(params, policy, ratios, gens)
        sent, bound = 0, 0.0
        for n in range(workers):
            m = {k: v[n] for k, v in masks.items()}
            arrays, _ = payload.encode(params, m, seeded=seeded)
            sent += payload.nbytes(arrays)
            pruned = 1 - sum(int(v.sum()) for v in m.values()) / sum(
                v.numel() for v in m.values())
            bound += dense * (1 - (pruned - (0 if seeded else 1 / 32)))
        rows.append({"policy": policy, "mask": "seed" if seeded else "bits",
                     "dense_bytes": dense * workers, "sent_bytes": sent,
                     "bound_bytes": bound, "ratio": sent / (dense * workers)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--skip-simulation", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    print(f"load average at start: {os.getloadavg()}")
    rows = [run_in_process(work, args.workers, args.rounds)]
    rows.append(run_flower(work, "loopback", args.workers, args.rounds, simulation=False,
                           poll=0.5))
    rows.append(run_flower(work, "loopback-poll3s", args.workers, args.rounds,
                           simulation=False, poll=3.0))
    if not args.skip_simulation:
        try:
            import ray  # noqa: F401

            rows.append(run_flower(work, "simulation", args.workers, args.rounds,
                                   simulation=True, poll=0.5))
        except ImportError:
            print("simulation: skipped (Ray not installed: pip install 'flwr[simulation]')")
    print(f"load average at end: {os.getloadavg()}")

    def mean(xs):
        xs = [x for x in xs if x == x]
        return sum(xs) / len(xs) if xs else float("nan")

    print("\n| engine | wall s | round s (mean) | slowest worker s | overhead s/round "
          "| of which ClientApp process start s | peak MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['wall_s']:.1f} | {mean(r['round_s']):.1f} | "
              f"{mean(r['slowest_worker_s']):.1f} | {mean(r['overhead_s']):.1f} | "
              f"{mean(r['clientapp_start_s']):.1f} | {r['peak_mb']:.0f} |")
    sizes = payload_bytes(args.workers)
    print("\n| masks (level S) | dense FedAvg bytes/round | sent bytes/round | sent/dense "
          "| issue bound |\n|---|---|---|---|---|")
    for s in sizes:
        ok = "met" if s["sent_bytes"] <= s["bound_bytes"] else "MISSED"
        print(f"| {s['policy']} ({s['mask']}) | {s['dense_bytes']:,} | {s['sent_bytes']:,} | "
              f"{s['ratio']:.3f} | {s['bound_bytes']:,.0f} ({ok}) |")
    loop = next(r for r in rows if r["engine"] == "loopback")
    print(f"\ntarget: loopback overhead <= 5 s per round: "
          f"{'met' if mean(loop['overhead_s']) <= 5 else 'MISSED'} "
          f"({mean(loop['overhead_s']):.1f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flower_overhead.json").write_text(
        json.dumps({"engines": rows, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
