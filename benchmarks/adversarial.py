"""Does every bad input and fault at the edges end in one clear message? (issue 16 items 6-7)

A catalogue of hostile command lines, each run as a real `fedscore` process in a folder of
its own: bad values of every numeric config field (inf, nan, booleans, strings, values
below their bound), bad run names and --out folders, missing / unreadable / non-YAML config
files, unknown keys and names, data folders that do not exist, wrong image sizes, damaged /
foreign / truncated checkpoints for --resume and run folders for sample / evaluate, damaged
mnist5k caches, and full or read-only disks (a real tmpfs in a private mount namespace, when
`unshare -r -m` is allowed). A bad input is *clean* when the process exits with code 2, says
so in one `fedscore: error:` line (or one usage `Error:` of the command line parser), prints
no traceback and writes nothing outside its --out folder (and the cache). A case expected to
work (a damaged cache is rebuilt; --out x/../../y is ../y) is clean when it exits 0 and
writes only its --out folder.

Faults: `fedscore train` killed with SIGKILL at seeded random moments, then resumed (or
restarted when no checkpoint was written yet); it survived when the final model.safetensors
is bit-identical to an uninterrupted run's.

    PYTHONPATH=src .venv/bin/python benchmarks/adversarial.py --jobs 2 --kills 6 \\
        --json runs/adversarial.json

A few minutes on a 2-core CPU; the totals go to docs/reliability.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "fedscore.cli"]
SRC = Path(__file__).resolve().parents[1] / "src"
# cases run in folders of their own: this checkout's code, whatever the working folder
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SRC), *(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p)])
TOY = ["--set", "model.options={hidden: 8, depth: 1}", "--set", "train.eval_batch=4",
       "--set", "train.batch_size=8", "--set", "train.checkpoint_every=1", "--set",
       "train.log_every=1"]
FED = ["--config", "{repo}/configs/flower-toy.yaml", "--set", "federation.rounds=2",
       "--set", "federation.local_steps=1", "--set", "train.eval_batch=4"]
SAFE = ["--set", "train.steps=1", "--set", "train.eval_batch=4", "--set",
        "model.options={hidden: 8, depth: 1}"]  # were a bad value accepted: a tiny run
MNIST = ["--set", "data.name=mnist5k", "--set", "model.kind=unet", "--set", "train.steps=1",
         "--set", "train.batch_size=2", "--set", "train.eval_batch=2", "--set", "sample.n=2",
         "--set", "sample.steps=2"]  # train samples sample.n at the end: keep it cheap


@dataclass
class Case:
    id: str
    group: str
    args: list[str]
    expect: str = "error"  # or "ok"
    setup: str = ""  # a named preparation of the case's folder (SETUPS)
    shell: str = ""  # run inside a private mount namespace around this script
    result: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the catalogue


def numeric_cases() -> list[Case]:
    """inf, nan, a boolean, a string, and the first value below its bound, for every
    numeric field of RunConfig (read from the pydantic models, so a new field is tried)."""
    from fedscore.config import FederationConfig, PartitionConfig, RunConfig

    cases = []

    def walk(model, prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = prefix + name
            sub = {"data", "model", "diffusion", "train", "sample", "theory"}
            if name in sub and prefix == "":
                walk(f.annotation, key + ".")
                continue
            args = str(f.annotation)
            if "int" not in args and "float" not in args or "list" in args:
                continue
            bounds = {type(m).__name__: m for m in f.metadata}
            values = [".inf", "-.inf", ".nan", "true", "abc", "[1]"]
            if "Ge" in bounds:
                values.append(str(bounds["Ge"].ge - 1))
            if "Gt" in bounds:
                values.append(str(bounds["Gt"].gt))
            if "Lt" in bounds:
                values.append(str(bounds["Lt"].lt))
            if "Le" in bounds:
                values.append(str(bounds["Le"].le + 1))
            for v in values:  # the bad value last: a later --set wins
                cases.append(Case(f"set {key}={v}", "numeric",
                                  ["train", *SAFE, "--set", f"{key}={v}"]))

    walk(RunConfig, "")
    walk(FederationConfig, "federation.")
    walk(PartitionConfig, "federation.partition.")
    return cases


def name_cases() -> list[Case]:
    names = ["../../x", "/tmp/fedscore-escaped", "", "..", ".", "a/b", "-x", "x" * 200,
             "a b", "r\u00e9sum\u00e9", "x\\y", "~/x"]
    # no --out: a name that got through would write under cwd/runs/<name> (or escape it)
    cases = [Case(f"name={n!r}", "names", ["train", *SAFE, "--set", f"name={n}"],
                  setup="no-out") for n in names]
    cases += [Case(f"--out {o!r}", "names", ["train", *SAFE, "--out", o])
              for o in ["out/my run", "/", "out/-x"]]
    cases.append(Case("--out x/../../y", "names",
                      ["train", "--out", "x/../../y", "--set", "train.steps=1", *TOY],
                      expect="ok"))
    return cases


def config_cases() -> list[Case]:
    bad = [
        ("missing file", ["--config", "missing.yaml"], ""),
        ("a folder as config", ["--config", "."], ""),
        ("bad YAML", ["--config", "c.yaml"], "yaml:train: {steps: [1, 2\n"),
        ("a YAML list", ["--config", "c.yaml"], "yaml:- 1\n- 2\n"),
        ("binary garbage", ["--config", "c.yaml"], "bytes"),
        ("unknown top key", ["--set", "trian.steps=1"], ""),
        ("unknown nested key", ["--set", "train.stepz=1"], ""),
        ("override without =", ["--set", "train.steps"], ""),
        ("override of a section", ["--set", "train=5"], ""),
        ("override under a number", ["--set", "train.steps.x=1"], ""),
        ("federation=maybe", ["--set", "federation=maybe"], ""),
        ("sample.method=foo", ["--set", "sample.method=foo"], ""),
        ("diffusion.grid=foo", ["--set", "diffusion.grid=foo"], ""),
        ("delta >= T", ["--set", "diffusion.delta=6"], ""),
        ("model.kind=foo", ["--set", "model.kind=foo"], ""),
        ("precision=fp8", ["--set", "precision=fp8"], ""),
        ("--precision fp8", ["--precision", "fp8", "--set", "train.steps=1", *TOY], ""),
        ("--device tpu", ["--device", "tpu", "--set", "train.steps=1", *TOY], ""),
        ("--device cuda:99", ["--device", "cuda:99", "--set", "train.steps=1", *TOY], ""),
        ("model.options.foo=1", ["--set", "model.options.foo=1", "--set", "train.steps=1"], ""),
        ("model.options.hidden=-1",
         ["--set", "model.options.hidden=-1", "--set", "train.steps=1"], ""),
        ("model.options.hidden=abc",
         ["--set", "model.options.hidden=abc", "--set", "train.steps=1"], ""),
        ("model.size=huge", ["--set", "data.name=digits", "--set", "model.kind=unet",
                             "--set", "model.size=huge", "--set", "train.steps=1"], ""),
        ("mlp on images", ["--set", "data.name=digits", "--set", "train.steps=1"], ""),
        ("keep_ratios length", [*FED, "--set", "federation.keep_ratios=[0.5]"], ""),
        ("keep_ratios > 1", [*FED, "--set", "federation.keep_ratios=[2, 1, 1]"], ""),
        ("no level nor ratios", [*FED, "--set", "federation.level=null"], ""),
        ("scheme all, 3 workers", [*FED, "--set", "federation.partition.scheme=all"], ""),
        ("more workers than data", [*FED, "--set", "federation.workers=5000",
                                    "--set", "federation.partition.scheme=iid"], ""),
        ("shards: too many classes",
         [*FED, "--set", "federation.partition.classes_per_worker=50"], ""),
    ]
    cases = [Case(name, "config", ["train", *SAFE, *args],
                  setup="garbage" if text == "bytes" else text) for name, args, text in bad]
    cases.append(Case("--node-device x", "config", ["flower", "run", *FED, "--node-device", "x"]))
    return cases


def data_cases() -> list[Case]:
    d = [
        ("unknown dataset", ["--set", "data.name=nope"]),
        ("gmm without preset", ["--set", "data.name=gmm"]),
        ("unknown gmm preset", ["--set", "data.name=gmm:nope"]),
        ("image size 13x13", ["--set", "data.name=mnist5k:13x13"]),
        ("image size 0x0", ["--set", "data.name=mnist5k:0x0"]),
        ("image size abc", ["--set", "data.name=digits:abc"]),
        ("local data, no data_root", ["--set", "data.name=mnist"]),
        ("data folder missing", ["--set", "data.name=mnist", "--set", "data.data_root=nope"]),
        ("data folder of garbage", ["--set", "data.name=mnist", "--set", "data.data_root=d"]),
        ("cifar10 folder empty", ["--set", "data.name=cifar10", "--set", "data.data_root=."]),
    ]
    cases = [Case(n, "data", ["train", *SAFE, *a],
                  setup="mnist-garbage" if "garbage" in n else "") for n, a in d]
    for damage in ["truncate", "flip", "text", "empty", "foreign"]:
        cases.append(Case(f"mnist5k cache {damage}", "cache", ["train", *MNIST], expect="ok",
                          setup=f"cache-{damage}"))
    return cases


def checkpoint_cases() -> list[Case]:
    resume = ["train", "--resume", "--set", "train.steps=3", *TOY]
    cases = [Case("resume with no run", "checkpoint", resume)]
    for damage in ["garbage", "truncate", "empty", "flip-header", "foreign", "directory",
                   "bigger-model"]:
        cases.append(Case(f"resume: checkpoint {damage}", "checkpoint", resume,
                          setup=f"run+ckpt-{damage}"))
    runs = [
        ("sample: no such folder", ["sample", "nope", "--n", "4"], ""),
        ("sample: not a run", ["sample", ".", "--n", "4"], ""),
        ("sample: model garbage", ["sample", "{out}", "--n", "4"], "run+model-garbage"),
        ("sample: model truncated", ["sample", "{out}", "--n", "4"], "run+model-truncate"),
        ("sample: config.yaml bad", ["sample", "{out}", "--n", "4"], "run+config-garbage"),
        ("sample --n 0", ["sample", "{out}", "--n", "0"], "run"),
        ("sample --n -5", ["sample", "{out}", "--n", "-5"], "run"),
        ("sample --seed -1", ["sample", "{out}", "--n", "4", "--seed", "-1"], "run"),
        ("sample --seed 2^70",
         ["sample", "{out}", "--n", "4", "--seed", str(2**70)], "run"),
        ("evaluate: samples garbage",
         ["evaluate", "{out}", "--samples", "s.npz"], "run+samples-garbage"),
        ("evaluate: samples missing", ["evaluate", "{out}", "--samples", "nope.npz"], "run"),
        ("report: no such folder", ["report", "nope", "--out", "{out}"], ""),
        ("bound: no input", ["bound"], ""),
        ("bound: params missing", ["bound", "--params", "nope.yaml"], ""),
        ("experiment: unknown preset", ["experiment", "run", "nope"], ""),
        ("experiment: preset of garbage", ["experiment", "run", "c.yaml"], "garbage"),
        ("agents sample: no folder", ["agents", "sample", "nope"], ""),
        ("agents: unknown regime", ["agents", "train", "--regime", "nope"], ""),
        ("agents: 0 agents", ["agents", "train", "--agents", "0"], ""),
    ]
    cases += [Case(n, "run folders", a, setup=s) for n, a, s in runs]
    return cases


def disk_cases() -> list[Case]:
    """Full and read-only disks: a real tmpfs (or a read-only one) mounted on the case's out
    folder in a private mount namespace; {cli} is the case's command."""
    train = ["train", "--set", "train.steps=3", *TOY]
    full = ("mount -t tmpfs -o size=64k tmpfs {disk} && "
            "dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null; {cli}")
    resume_full = ("mount -t tmpfs -o size=384k tmpfs {disk} && {first} >/dev/null 2>&1 && "
                   "cp {disk}/run/checkpoint.safetensors {base}/before.safetensors && "
                   "free=$(df -k --output=avail {disk} | tail -1) && "
                   "dd if=/dev/zero of={disk}/filler bs=1k count=$((free - 4)) 2>/dev/null; "
                   "{cli}; rc=$?; cp -a {disk}/run {base}/kept; exit $rc")
    read_only = "mount -t tmpfs -o ro,size=64k tmpfs {disk} && {cli}"
    cache_full = ("mount -t tmpfs -o size=64k tmpfs {base}/cache && "
                  "dd if=/dev/zero of={base}/cache/filler bs=4k 2>/dev/null; {cli}")
    return [
        Case("disk full from the start", "disk", train, shell=full),
        Case("disk full mid-resume", "disk", ["train", "--resume", "--set",
                                              "train.steps=40", *TOY], shell=resume_full),
        Case("read-only out folder", "disk", train, shell=read_only),
        Case("cache on a full disk", "disk", ["train", *MNIST], expect="ok", shell=cache_full,
             setup="no-cache"),
        Case("--out is a file", "disk", ["train", "--out", "f", *TOY], setup="file-f"),
    ]


# ---------------------------------------------------------------- running one case


def prepare(case: Case, base: Path, cwd: Path, out: Path, shared: Path) -> None:
    s = case.setup
    cache = base / "cache"
    if s.startswith("yaml:"):
        (cwd / "c.yaml").write_text(s[5:])
    elif s == "garbage":
        (cwd / "c.yaml").write_bytes(bytes(range(256)) * 4)
    elif s == "mnist-garbage":
        raw = cwd / "d" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for part in ("train", "t10k"):
            for kind, dim in (("images", 3), ("labels", 1)):
                (raw / f"{part}-{kind}-idx{dim}-ubyte").write_bytes(b"\0" * 100)
    elif s.startswith("cache-"):
        shutil.copytree(shared / "cache", cache)
        (npz,) = (cache / "data").glob("*.npz")
        damage_file(npz, s[6:])
    elif s == "file-f":
        (cwd / "f").write_text("a file, not a folder\n")
    elif s.startswith("run"):
        shutil.copytree(shared / "run", out)
        what, _, damage = s[4:].partition("-")
        if what == "ckpt" and damage == "bigger-model":
            shutil.copy(shared / "big" / "checkpoint.safetensors", out)
        elif what == "ckpt" and damage == "directory":
            (out / "checkpoint.safetensors").unlink()
            (out / "checkpoint.safetensors").mkdir()
        elif what == "ckpt":
            damage_file(out / "checkpoint.safetensors", damage)
        elif what == "model":
            damage_file(out / "model.safetensors", damage)
        elif what == "config":
            damage_file(out / "config.yaml", damage)
        elif what == "samples":
            (cwd / "s.npz").write_bytes(b"PK\x03\x04 not really a zip")
    if s != "no-cache" and not cache.exists() and not s.startswith("cache-"):
        shutil.copytree(shared / "cache", cache)  # the parsed mnist5k arrays


def damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif how == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid: mid + 64])
                         + data[mid + 64:])
    elif how == "flip-header":
        path.write_bytes(data[:8] + bytes(b ^ 0xFF for b in data[8:40]) + data[40:])
    elif how in ("text", "garbage"):
        path.write_bytes(b"not what it should be\n" * 3)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":
        import numpy as np

        with open(path, "wb") as f:
            np.savez(f, x=np.zeros((3, 3)), y=np.zeros(3))


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(case: Case, root: Path, shared: Path, repo: Path) -> dict:
    base = root / hashlib.sha256(case.id.encode()).hexdigest()[:12]
    cwd = base / "a" / "b" / "cwd"  # three levels deep: '../../x' still lands under base
    out = base / "out" / "run"
    cwd.mkdir(parents=True)
    prepare(case, base, cwd, out, shared)
    args = [a.replace("{repo}", str(repo)).replace("{out}", str(out)) for a in case.args]
    if case.args[0] in ("train", "agents", "flower") and "--out" not in args \
            and case.setup != "no-out":
        args += ["--out", str(out)]
    before = files(base)
    env = {**os.environ, "FEDSCORE_CACHE": str(base / "cache"), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    if case.shell:
        if not shared.joinpath("tmpfs-ok").exists():
            return {"skipped": "no unprivileged mount namespace"}
        disk = out.parent
        disk.mkdir(parents=True, exist_ok=True)
        (base / "cache").mkdir(exist_ok=True)
        cli = shlex.join([*CLI, *args])
        first = shlex.join([*CLI, "train", "--out", str(out), "--set", "train.steps=2", *TOY])
        script = case.shell.format(disk=disk, cli=cli, base=base, first=first)
        proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        before |= {"out", "cache"}
    else:
        proc = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
    seconds = time.perf_counter() - t0
    made = files(base) - before
    outside = sorted(p for p in made if not (p.startswith("out") or p.startswith("cache")
                                             or p.startswith("kept")
                                             or p == "before.safetensors"))
    if case.id == "--out x/../../y":  # its --out is base/a/b/y
        outside = [p for p in outside if not p.startswith("a/b/y")]
    err = proc.stderr
    errors = [ln for ln in err.splitlines() if ln.startswith("fedscore: error:")]
    usage = [ln for ln in err.splitlines() if "Error" in ln and "fedscore: error" not in ln]
    problems = []
    if "Traceback" in err + proc.stdout:
        problems.append("traceback")
    if outside:
        problems.append(f"wrote outside --out: {outside[:3]}")
    if case.expect == "ok":
        if proc.returncode != 0:
            problems.append(f"exit {proc.returncode}")
    else:
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if len(errors) + (len(usage) > 0) != 1:
            problems.append(f"{len(errors)} error lines")
    if case.id == "disk full mid-resume" and not problems:
        problems += check_kept(base)
    lines = err.strip().splitlines()
    first = (errors or usage or lines[-1:] or [""])[0]
    at = lines.index(first) if first in lines else 0
    message = " ".join(ln.strip() for ln in lines[at: at + 2]) if first.endswith(":") else first
    return {"rc": proc.returncode, "clean": not problems, "problems": problems,
            "message": message[:300], "seconds": round(seconds, 1)}


def check_kept(base: Path) -> list[str]:
    """The checkpoint left on the full disk is whole and finite."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(base / "kept" / "checkpoint.safetensors"))
    except Exception as err:  # what a damaged checkpoint raises: the finding itself
        return [f"checkpoint damaged: {err}"]
    if not all(v.isfinite().all() for v in tensors.values() if v.is_floating_point()):
        return ["checkpoint not finite"]
    return []


# ---------------------------------------------------------------- kill -9


def kill_faults(root: Path, n: int, seed: int, repo: Path) -> list[dict]:
    """n SIGKILLs at seeded random moments of a centralised and a federated toy run (half
    each), each followed by --resume (or a fresh start when no checkpoint was written) until
    the run finishes; survived = model.safetensors bit-identical to an uninterrupted run."""
    kinds = {
        "central": ["train", "--set", "train.steps=400", *TOY[:-4],
                    "--set", "train.checkpoint_every=20", "--set", "train.log_every=20"],
        "federated": ["train", "--config", f"{repo}/configs/flower-toy.yaml", "--set",
                      "federation.rounds=12", "--set", "federation.local_steps=5", "--set",
                      "train.eval_batch=8", "--set", "federation.strategy=sequential"],
    }
    rng = random.Random(seed)
    env = {**os.environ, "FEDSCORE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    results = []
    for kind, args in kinds.items():
        ref = root / "kill" / f"{kind}-ref"
        reference = started_run(args, ref, env)
        if reference.wait() != 0:
            raise SystemExit(f"the uninterrupted {kind} run failed")
        span = time.perf_counter() - reference.started
        for i in range(n // 2 + (n % 2 if kind == "central" else 0)):
            out = root / "kill" / f"{kind}-{i}"
            delay = rng.uniform(0, span)  # after the folder appeared: during training
            proc = started_run(args, out, env)
            time.sleep(delay)
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            steps = []
            for _ in range(3):  # resume until it finishes (a fresh start if nothing to resume)
                if (out / "model.safetensors").is_file():
                    break
                again = ["--resume"] if (out / "checkpoint.safetensors").is_file() else []
                p = subprocess.run([*CLI, *args, "--out", str(out), *again], env=env,
                                   capture_output=True, text=True, timeout=600)
                steps.append({"resume": bool(again), "rc": p.returncode,
                              "message": (p.stderr.strip().splitlines() or [""])[-1][:200]})
            same = ((out / "model.safetensors").is_file() and (out / "model.safetensors")
                    .read_bytes() == (ref / "model.safetensors").read_bytes())
            results.append({"id": f"kill -9 {kind} at +{delay:.2f}s", "killed": killed,
                            "after": steps, "survived": same})
            print(f"  kill -9 {kind:9s} at +{delay:5.2f}s of {span:.1f}s: "
                  f"{'survived' if same else 'NOT survived'} {steps}", flush=True)
    return results


class _Run(subprocess.Popen):
    started: float = 0.0


def started_run(args: list[str], out: Path, env: dict) -> _Run:
    """`fedscore ARGS --out OUT` started, returned once OUT/config.yaml exists (imports and
    set-up done: the run is training); .started is that moment."""
    proc = _Run([*CLI, *args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    while not (out / "config.yaml").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.started = time.perf_counter()
    return proc


# ---------------------------------------------------------------- main


def make_shared(shared: Path, repo: Path) -> None:
    """What cases copy: a parsed mnist5k cache, a finished toy run, a bigger model's
    checkpoint; and whether a tmpfs can be mounted without privileges."""
    env = {**os.environ, "FEDSCORE_CACHE": str(shared / "cache"), "OMP_NUM_THREADS": "1"}
    code = "from fedscore import data; data.load('mnist5k')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    for name, extra in (("run", []), ("big", ["--set", "model.options.hidden=16"])):
        subprocess.run([*CLI, "train", "--out", str(shared / name), "--set", "train.steps=2",
                        *TOY, *extra], env=env, check=True, capture_output=True, timeout=600)
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {shared}"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        (shared / "tmpfs-ok").touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="cases run side by side (at most 2)")
    ap.add_argument("--kills", type=int, default=6, help="kill -9 fault points")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--only", default="", help="run the cases whose id holds this text")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    cases = (numeric_cases() + name_cases() + config_cases() + data_cases()
             + checkpoint_cases() + disk_cases())
    cases = [c for c in cases if args.only in c.id]
    root = Path(tempfile.mkdtemp(prefix="fedscore-adversarial-"))
    t0 = time.perf_counter()
    try:
        make_shared(root / "shared", repo)
        with ThreadPoolExecutor(min(args.jobs, 2)) as pool:
            futures = [pool.submit(run_case, c, root, root / "shared", repo) for c in cases]
            for case, future in zip(cases, futures, strict=True):
                case.result = future.result()
                r = case.result
                state = "skip" if "skipped" in r else "clean" if r["clean"] else "NOT CLEAN"
                print(f"{state:9s} {case.group:11s} {case.id[:44]:44s} "
                      f"{r.get('rc', '')!s:>3} {r.get('message', r.get('skipped', ''))[:90]}"
                      + (f"  <- {r['problems']}" if r.get("problems") else ""), flush=True)
        kills = kill_faults(root, args.kills, args.seed, repo) if args.kills else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tried = [c for c in cases if "skipped" not in c.result]
    clean = [c for c in tried if c.result["clean"]]
    groups = sorted({c.group for c in tried})
    print("\ngroup        tried  clean")
    for g in groups:
        print(f"{g:11s} {sum(c.group == g for c in tried):6d} "
              f"{sum(c.group == g for c in clean):6d}")
    print(f"{'total':11s} {len(tried):6d} {len(clean):6d}   bad inputs tried / clean errors "
          f"(expected-to-work cases: {sum(c.expect == 'ok' for c in tried)})")
    killed = [k for k in kills if k["killed"]]  # a run that finished first was not hit
    print(f"kill -9 faults injected / survived: {len(killed)} / "
          f"{sum(k['survived'] for k in killed)} (runs that finished before their kill: "
          f"{len(kills) - len(killed)})")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "tried": len(tried), "clean": len(clean),
            "kills": {"injected": sum(k["killed"] for k in kills),
                      "survived": sum(k["survived"] for k in kills if k["killed"]),
                      "points": kills},
            "cases": [asdict(c) for c in cases]}, indent=1))


if __name__ == "__main__":
    main()
