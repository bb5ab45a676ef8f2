"""Federated inference's application layer: agents as run folders (`fedscore agents ...`).

`train_agents` trains K class-conditional score models, each alone on its partition (FI
paper §4.1), one run folder per agent; `load_agents` stacks them into one
`fedscore.inference.StackedAgents` with their class counts; `sample_agents` and
`diagnose_agents` are `fedscore agents sample` and `fedscore agents diagnose`. The maths
(stacked forward passes, aggregators, diagnostics) lives in `fedscore.inference`; this
module adds run folders, configs and training, which that layer must not import.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.config import RunConfig, dump_config, load_config
from fedscore.data import shape_and_classes
from fedscore.errors import FedscoreError, unknown
from fedscore.experiments.diffusers_agents import (
    agent_config,
    is_diffusers_folder,
    load_diffusers_agent,
    signature,
)
from fedscore.federated.engine import in_threads
from fedscore.inference.agents import (
    COUNTS_FILE,
    REGIMES,
    STRATEGIES,
    StackedAgents,
    read_class_counts,
)
from fedscore.inference.diagnostics import markdown_table, score_diagnostics, write_csv
from fedscore.inference.sampling import agents_score_fn, draw, route_generator
from fedscore.io import atomic_write_text
from fedscore.runs.evaluate import FIGURE, SAMPLES, read_config, write_samples
from fedscore.runs.folder import RunFolder
from fedscore.runs.plots import image_grid
from fedscore.runs.sampling import on_device, sampling_grid
from fedscore.runs.train import load_model, train_central
from fedscore.runtime import CPU_FP32, Runtime, for_run, from_config, pinned

AGGREGATOR_NAMES = ("mean", "weighted", "hybrid", "mixture", "route")
"""The aggregators an experiment or `fedscore agents sample` may name (SPEC §3)."""
SAMPLER = "exp-integrator"


def same_run_config(path: Path, cfg) -> bool:
    """Was the run folder `path` made with `cfg`? Where the folder lies (out_dir) and where
    and in what precision it ran (device, precision) may differ: a moved or copied
    experiment folder is still reused, a run trained on a GPU still sampled on a CPU."""
    kept = load_config(path / "config.yaml")
    return kept == cfg.model_copy(update={"out_dir": kept.out_dir, "device": kept.device,
                                          "precision": kept.precision})


def train_agents(
    cfg, regime: str, out_dir: str | Path | None = None, *, n_agents: int = 10,
    progress: bool = True, runtime: Runtime | None = None,
) -> list[Path]:
    """Train one class-conditional score model per partition of the training split, each
    alone on its own data (train_central on its indices), for a regime of FI §4.1.

    Agent j's run folder is `out_dir/agent-jj` (out_dir defaults to cfg.run_dir()), seeded
    cfg.seed + j, and holds class_counts.json: its per-class sample counts, the only thing
    the server may learn of its data. `out_dir/agents.json` lists the agents and their
    counts. The control regime has one agent whatever n_agents says. A finished agent
    (model.safetensors present, same config) is kept; an interrupted one is resumed.
    runtime: where they train (default: the config's device and precision, resolved).
    Returns the agents' run folders.
    """
    if regime not in REGIMES:
        raise unknown("regime", regime, REGIMES)
    if not cfg.model.conditional:
        raise FedscoreError(
            "model.conditional is false, but federated inference's agents are class-"
            "conditional score models (SPEC §3): set model.conditional: true"
        )
    if cfg.federation != "none":
        raise FedscoreError(
            "agents train alone (centrally, on their own partition): set federation: none; "
            "the regime chooses the partition"
        )
    runtime = runtime or from_config(cfg)
    cfg = pinned(cfg, runtime)
    out = Path(out_dir) if out_dir is not None else cfg.run_dir()
    _, labels = datasets.load(cfg.data, split="train")
    n_workers = 1 if regime == "control" else n_agents
    parts = datasets.partition(labels, REGIMES[regime], n_workers=n_workers, seed=cfg.seed)
    # counts over the model's label space (model.num_classes wins over the data's)
    classes = datasets.shape_and_classes(cfg)[1]
    datasets.check_labels(labels, classes, "the training data")
    counts = datasets.class_histogram(labels, parts, n_classes=classes)
    folders, summary, todo = [], [], []
    for j, idx in enumerate(parts):
        agent = cfg.model_copy(update={"name": f"agent-{j:02d}", "out_dir": str(out),
                                       "seed": cfg.seed + j})
        path = agent.run_dir()
        if (path / "config.yaml").is_file() and not same_run_config(path, agent):
            raise FedscoreError(
                f"{str(path)!r} holds an agent trained with another config; choose another "
                "output folder (--out) or remove it"
            )
        if not (path / "model.safetensors").is_file():
            todo.append((j, agent, path, idx))
        folders.append(path)
        summary.append({"folder": path.name, "class_counts": counts[j].tolist()})

    # On a CPU with more than one core the agents train side by side, one intra-op thread
    # each (engine.in_threads: a small U-Net's convolutions barely use a second thread);
    # their progress is one bar over agents then.
    threads = torch.get_num_threads() if runtime.device.type == "cpu" else 1
    side_by_side = threads > 1 and len(todo) > 1
    bar = tqdm(total=len(todo), desc="agents", disable=not (progress and side_by_side))

    def train_one(i: int) -> None:
        j, agent, path, idx = todo[i]
        resume = (path / "checkpoint.safetensors").is_file()
        if not resume:  # stopped before its first checkpoint: nothing to resume, start over
            (path / "metrics.jsonl").unlink(missing_ok=True)
        folder = RunFolder.open(agent, resume=resume, path=path, runtime=runtime)
        atomic_write_text(path / COUNTS_FILE, json.dumps(
            {"class_counts": counts[j].tolist(), "n_samples": int(len(idx))}, indent=2))
        train_central(agent, resume=resume, progress=progress and not side_by_side,
                      folder=folder, runtime=runtime, indices=torch.as_tensor(idx))
        bar.update()

    in_threads(train_one, len(todo), threads)
    bar.close()
    atomic_write_text(out / "agents.json", json.dumps(
        {"regime": regime, "scheme": REGIMES[regime], "dataset": cfg.data.name,
         "agents": summary}, indent=2))
    return folders


def load_agent(path: Path):
    """(model, RunConfig, class counts) of one agent: a run folder (its trained model, EMA
    weights when kept, and class_counts.json) or a diffusers folder (`diffusers_agents`)."""
    if is_diffusers_folder(path):
        return load_diffusers_agent(path)
    counts = read_class_counts(path)
    model, cfg = load_model(path)
    return model, cfg, counts


def load_agents(
    run_dirs: Sequence[str | Path], *, strategy: str = "auto", device: str | None = None
) -> StackedAgents:
    """Stack the agents of `run_dirs` (run folders: their EMA weights when kept; diffusers
    pipeline or unet folders: their weights, `experiments.diffusers_agents`) with their
    class counts; `.config` is the first agent's RunConfig. Run folders alone must share
    model, data and diffusion settings; a set with diffusers folders must share one
    architecture, item shape, labels, parameterisation and time map (`signature`)."""
    if strategy not in STRATEGIES:
        raise unknown("agent strategy", strategy, STRATEGIES)
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise FedscoreError("load_agents needs at least one agent run folder")
    models, cfgs, counts = zip(*(load_agent(d) for d in dirs))
    signatures = ([signature(m, c) for m, c in zip(models, cfgs)]
                  if any(is_diffusers_folder(d) for d in dirs) else None)
    check_agree([f"agent {str(d)!r}" for d in dirs], cfgs, signatures)
    width = max(len(c) for c in counts)
    counts_t = torch.tensor([c + [0] * (width - len(c)) for c in counts], dtype=torch.long)
    if device is not None:
        models = [m.to(device) for m in models]
    agents = StackedAgents(models[0], list(models), cfgs[0].diffusion.parameterisation,
                           strategy=strategy, counts=counts_t)
    agents.config = cfgs[0]
    return agents


SAME = ("model", "data", "diffusion")
"""What run-folder agents must share: federated inference combines agents of one
architecture on one dataset."""


def check_agree(names: Sequence[str], cfgs: Sequence[RunConfig],
                signatures: Sequence[dict] | None = None) -> None:
    """The agents combined into one score agree with agent 0, or one FedscoreError naming
    the first that does not (`names[i]`: how it is named). Run folders alone (signatures
    None) must share their `SAME` settings; a set with diffusers folders, whose configs are
    synthesised, must share `signature`: architecture (every parameter's shape), item shape,
    labels, parameterisation and time map. The one check of `load_agents` and of the Flower
    FI server, which gets the configs and signatures from the agents' SuperNodes."""
    if signatures is None:
        ref = {k: dump_config(getattr(cfgs[0], k)) for k in SAME}
        for name, cfg in zip(names[1:], cfgs[1:]):
            for k in SAME:
                if dump_config(getattr(cfg, k)) != ref[k]:
                    raise FedscoreError(
                        f"{name} has different `{k}` settings than {names[0]}: federated "
                        "inference combines agents of one architecture on one dataset")
        return
    for name, sig in zip(names[1:], signatures[1:]):
        for k, v in signatures[0].items():
            if sig.get(k) != v:
                what = ("another architecture" if k == "parameters"
                        else f"{sig.get(k)!r} vs {v!r}")
                raise FedscoreError(
                    f"{name} differs from {names[0]} in its {k} ({what}): federated "
                    "inference combines agents of one architecture on one kind of image")


def agents_runtime(run_dirs, device: str | None = None, precision: str | None = None
                   ) -> Runtime:
    """Where to run trained agents (`runtime.for_run` of the first agent's config)."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        return CPU_FP32
    cfg = agent_config(dirs[0]) if is_diffusers_folder(dirs[0]) else read_config(dirs[0])
    return for_run(cfg, device, precision)


def sample_agents(run_dirs, out: str | Path, *, aggregator: str = "mixture",
                  per_label: int = 10, steps: int = 100, seed: int = 0,
                  progress: bool = True, device: str | None = None,
                  precision: str | None = None) -> dict[str, Path]:
    """Federated inference from trained agents' run folders or diffusers folders
    (`load_agents`): `per_label` samples of every label (of class-conditional agents; of
    unconditional ones, `per_label` in all, combined by mean, mixture or route), the
    agents combined by `aggregator` at each of `steps` exponential-integrator steps (an SDE
    sampler: the mixture's density tracking needs its noise) on the agents'
    sampling grid (their config's `sample.grid` over [delta, T]); `route` assigns each
    sample its agent from `inference.sampling.route_generator(seed)`. Writes `samples.npz`
    (as `fedscore sample` does, so `fedscore evaluate AGENT_DIR --samples` scores it) and
    `samples.png` (one row per label) into `out`; returns their paths. device, precision:
    where the agents' networks run (`runtime.for_run`); the sampler and the aggregator stay
    on the CPU in fp32/fp64."""
    check_sampling(aggregator, per_label, steps)
    runtime = agents_runtime(run_dirs, device, precision)
    agents = load_agents(run_dirs, device=runtime.device)
    return sample_with(on_device(agents, runtime), out, aggregator=aggregator,
                       per_label=per_label, steps=steps, seed=seed, progress=progress,
                       where=f"{len(run_dirs)} agents")


def check_sampling(aggregator: str, per_label: int, steps: int) -> None:
    """The arguments every deployment of `fedscore agents sample` checks first."""
    if aggregator not in AGGREGATOR_NAMES:
        raise unknown("aggregator", aggregator, AGGREGATOR_NAMES)
    if per_label < 1 or steps < 1:
        raise FedscoreError(f"per_label and steps must be positive, got {per_label}, {steps}")


def sample_with(agents, out: str | Path, *, aggregator: str, per_label: int, steps: int,
                seed: int, progress: bool = False, where: str = "") -> dict[str, Path]:
    """`sample_agents`' sampling and files for any agents-like object: a callable
    (x, t[, y]) -> (K, B, ...) with what `agents_score_fn` reads (n_agents, with_labels,
    weights_for) and `config` (the agents' RunConfig). In-process that is
    StackedAgents; on Flower, the server's RemoteAgents (fi_server_app), hence the same
    labels, grid, aggregator, sampler and seed, and so the same samples.

    `route` with an object that defines `sample_routed(assignment, labels, shape, times,
    method, seed)` leaves the sampling to it: the assignment is drawn here, exactly as the
    in-process route draws it, and each agent draws its own rows where it lives (on Flower,
    one message per silo instead of one per step). where: said in the figure's title."""
    cfg = agents.config
    shape, classes = shape_and_classes(cfg)
    # unconditional agents (diffusers folders without a label table): per_label in total
    labels = (torch.arange(classes).repeat_interleave(per_label) if cfg.model.conditional
              else None)
    n = per_label if labels is None else len(labels)
    times = sampling_grid(cfg.model_copy(update={"sample": cfg.sample.model_copy(
        update={"steps": steps})}))
    generator = route_generator(seed) if aggregator == "route" else None
    score_fn = agents_score_fn(agents, labels, aggregator, generator=generator)
    routed = getattr(agents, "sample_routed", None)
    if aggregator == "route" and callable(routed):
        x = routed(score_fn.assign(n), labels, shape, times, SAMPLER, seed)
    else:
        x = draw(score_fn, n, shape, times, SAMPLER, seed, progress=progress)
    out = Path(out)
    npz = write_samples(out / SAMPLES, x, labels, seed)
    figure = image_grid(x.clamp(-1, 1), out / FIGURE, nrow=per_label,
                        title=f"federated inference ({aggregator}, {where})"
                        + ("" if labels is None else ": one row per label"))
    return {"samples": npz, "figure": Path(figure)}


def diagnostics_inputs(dataset, n: int, shape, classes: int, seed: int,
                       data_root: str | None = None) -> dict:
    """Per label: n pure-noise inputs and n real test images of that label (FI §4.3).
    dataset: a dataset name or the agents' DataConfig (`data.load`)."""
    images, labels = datasets.load(dataset, split="test", data_root=data_root)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in range(classes):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)[:n]]
        out[c] = {"noise": torch.randn((n, *shape), generator=g), "real": images[rows]}
    return out


def diagnose_agents(
    run_dirs, out: str | Path, *, aggregator: str = "mean", n_inputs: int = 10, seed: int = 0,
    device: str | None = None, precision: str | None = None,
) -> Path:
    """FI eqs. 9-13 for trained agents (`fedscore agents diagnose`): per label and t in
    {1, 0.5, 0.1, 0.01} (fractions of T), on n_inputs noise and n_inputs real test images,
    the aggregate's magnitude and the agents' cosine to it. Writes out/diagnostics-
    <aggregator>.csv and .md (a table laid out like the paper's); returns the .md path.
    Weighted aggregators use the agents' per-class counts of each input's label. device,
    precision: where the agents' networks run (`runtime.for_run`)."""
    runtime = agents_runtime(run_dirs, device, precision)
    agents = load_agents(run_dirs, device=runtime.device)
    cfg = agents.config
    shape, classes = datasets.shape_and_classes(cfg)
    if len(shape) != 3:
        raise FedscoreError(f"score diagnostics need an image dataset, got {cfg.data.name!r}")
    inputs = diagnostics_inputs(cfg.data, n_inputs, shape, classes, seed)
    T = float(diffusion.time_grid(**cfg.diffusion.grid_kwargs())[0])  # also ddpm-linear's
    records = score_diagnostics(
        on_device(agents, runtime), inputs, T=T, aggregator=aggregator,
        weights=None if aggregator == "mean" else agents.weights_for)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / f"diagnostics-{aggregator}.csv")
    md = out / f"diagnostics-{aggregator}.md"
    md.write_text(f"# Score diagnostics ({aggregator}, {agents.n_agents} agents)\n\n"
                  + markdown_table(records) + "\n")
    return md
