"""The one experiment runner: cells -> train -> sample -> evaluate -> report.

Every experiment (the pruning paper's table, the FI paper's table, the demo) is a preset
(fedscore.experiments.preset) run by `run_experiment`:

1. train each cell: a federated run (eqs. 7-8), a central model on the pooled training split
   (a finished run of the same config is loaded, an interrupted one resumed), or FI agents
   of one regime (finished agents are kept);
2. sample: every sample set (one per federated or central cell, one per agents cell and
   aggregator, real images for a `real` cell) from the SAME initial noise and generator
   seed, so the sets are paired (`fedscore.inference.draw`); `route` draws its assignment
   from `route_generator` of that seed;
3. evaluate every set with `fedscore.runs.evaluate.evaluate_samples` against the preset's
   reference split (one IS split rule, the reference named in every table);
4. report: report.md and a self-contained report.html through one renderer, results.json
   with every number.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import load_agents, same_run_config, train_agents
from fedscore.experiments.preset import Preset, load_preset
from fedscore.experiments.sections import write_report
from fedscore.inference.sampling import agents_score_fn, draw, route_generator
from fedscore.metrics import get_extractor
from fedscore.runs.evaluate import evaluate_samples
from fedscore.runs.federated import train_federated
from fedscore.runs.folder import RunFolder
from fedscore.runs.plots import image_grid
from fedscore.runs.sampling import model_score_fn, on_device
from fedscore.runs.train import load_model, train_central
from fedscore.runtime import CPU_FP32, Runtime, from_config


@dataclass
class Trained:
    """One trained cell: its run config and folder, and the model or the stacked agents."""

    cfg: Any = None
    path: Path | None = None
    model: Any = None
    agents: Any = None
    reused: bool = False


@dataclass
class Context:
    """Everything a report section or prose function reads."""

    preset: Preset
    out: Path
    trained: dict[str, Trained]
    rows: list[dict] = field(default_factory=list)
    grids: dict[str, Path] = field(default_factory=dict)
    classifier_accuracy: float = float("nan")
    reference_size: int = 0
    laps: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    """What sections add to results.json (name -> JSON-able)."""


@dataclass
class ExperimentResult:
    report: Path
    html: Path
    seconds: float
    rows: list[dict]


class Stopwatch:
    """Wall seconds per named stage, in order."""

    def __init__(self):
        self.start = self._t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now
        return self.laps[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------- 1. training


def train_federation(cfg, *, progress: bool = True, runtime: Runtime = CPU_FP32) -> Trained:
    """A federated cell's global model (eqs. 7-8). A finished run of the same config is
    loaded, an interrupted one resumed; a folder of another config is refused."""

    return _train_model(cfg, "a federated run", lambda resume: train_federated(
        cfg, resume=resume, progress=progress, runtime=runtime).model, runtime)


def train_central_cell(cfg, *, progress: bool = True, runtime: Runtime = CPU_FP32) -> Trained:
    """A central cell: one model trained on the whole training split (train_central), the
    baseline of pooled data that no silo may share. Reused and resumed as a federated
    cell."""

    return _train_model(cfg, "a central run", lambda resume: train_central(
        cfg, resume=resume, progress=progress, runtime=runtime).model, runtime)


def _train_model(cfg, what: str, train: Callable, runtime: Runtime) -> Trained:
    """One model's run folder: loaded when finished with the same config, resumed from its
    checkpoint when interrupted, trained by `train(resume)` otherwise; a folder of another
    config is refused rather than mixed in."""

    path = cfg.run_dir()
    if (path / "config.yaml").is_file() and not same_run_config(path, cfg):
        raise FedscoreError(
            f"{str(path)!r} holds {what} of another budget; choose another --out "
            "folder or remove it")
    if (path / "model.safetensors").is_file():
        return Trained(cfg, path, load_model(path)[0].to(runtime.device).eval(), reused=True)
    resume = (path / "checkpoint.safetensors").is_file()
    return Trained(cfg, path, train(resume).eval())


def train_agents_cell(cfg, regime: str, path: Path, n_agents: int, *,
                      progress: bool = True, runtime: Runtime = CPU_FP32) -> Trained:
    """An agents cell: K agents of the regime, each alone on its partition, stacked."""

    done = all((path / f"agent-{j:02d}" / "model.safetensors").is_file()
               for j in range(1 if regime == "control" else n_agents))
    dirs = train_agents(cfg, regime, path, n_agents=n_agents, progress=progress,
                        runtime=runtime)
    return Trained(cfg, path, agents=load_agents(dirs, device=runtime.device), reused=done)


def same_silos(fed_dir: Path, agents_dir: Path) -> bool:
    """Do the agents hold exactly the federation's silos? (class counts per silo)"""
    fed = json.loads((fed_dir / "partition.json").read_text())["class_histogram"]
    agents = [a["class_counts"] for a in
              json.loads((agents_dir / "agents.json").read_text())["agents"]]
    return fed == agents


# ---------------------------------------------------------------- 2. sampling


def real_reference(dataset: str, split: str, per_label: int, seed: int, classes: int
                   ) -> tuple[Tensor, Tensor]:
    """per_label real images of every label: what the metrics give real data at the
    samples' size (FID at 100 samples is far above 0 even for real digits)."""
    images, labels = datasets.load(dataset, split=split)
    g = torch.Generator().manual_seed(seed)
    rows = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    pick = torch.cat([r[torch.randperm(len(r), generator=g)[:per_label]] for r in rows])
    return images[pick], labels[pick]


def sample_sets(preset: Preset, trained: dict[str, Trained], *, progress: bool = True,
                runtime: Runtime = CPU_FP32) -> list[dict]:
    """Every sample set of the experiment, in cell order: {cell, label, aggregator,
    images, labels, mixture, evals_per_step} (mixture: the mixture aggregator, read for its
    final weights; evals_per_step: network evaluations per sample per sampler step, one for
    a single model and `route`, K for the other aggregators). The networks run on `runtime`
    (where the trained models lie); the samplers' state and noise stay on the CPU in fp32,
    so every device draws the same noise, and `route` draws its agents from
    `route_generator(seed)`, as `fedscore agents sample` does (its own stream: the noise
    stays that of the other sets)."""

    info = datasets.info(preset.dataset)
    shape, s = tuple(info.shape), preset.sampling
    labels = torch.arange(info.classes).repeat_interleave(s.per_label)
    seed = preset.seed + s.seed_offset
    sets = []
    for name, cell in preset.cells.items():
        t = trained[name]
        if cell.kind == "real":
            x, y = real_reference(preset.dataset, cell.split, s.per_label, preset.seed,
                                  info.classes)
            sets.append({"cell": name, "label": cell.label, "aggregator": None,
                         "images": x, "labels": y})
            continue
        times = diffusion.time_grid(s.grid, s.steps, T=t.cfg.diffusion.T,
                                    delta=t.cfg.diffusion.delta)
        if cell.kind in ("federated", "central"):
            score_fn = on_device(model_score_fn(t.model, t.cfg, labels), runtime)
            x = draw(score_fn, len(labels), shape, times, s.method, seed, clip=s.clip,
                     progress=progress)
            sets.append({"cell": name, "label": cell.label, "aggregator": None,
                         "images": x, "labels": labels, "evals_per_step": 1.0})
            continue
        for agg in cell.aggregators:
            score_fn = agents_score_fn(on_device(t.agents, runtime), labels, agg, clip=s.clip,
                                       generator=route_generator(seed))
            x = draw(score_fn, len(labels), shape, times, s.method, seed, progress=progress)
            evals = (score_fn.evaluations / (len(labels) * s.steps) if agg == "route"
                     else float(t.agents.n_agents))
            sets.append({"cell": name, "label": cell.label.format(aggregator=agg),
                         "aggregator": agg, "images": x, "labels": labels,
                         "mixture": score_fn if agg == "mixture" else None,
                         "evals_per_step": evals})
    return sets


# ---------------------------------------------------------------- 3. evaluation


def federated_facts(path: Path) -> dict[str, Any]:
    """A federated run's last-round numbers from its metrics.jsonl: final loss, the last
    held-out eq. 9, Gamma* and bytes sent by all workers in the last round."""

    records = RunFolder(path).metrics()
    eq9 = [r["eq9_heldout"] for r in records if r.get("eq9_heldout") is not None]
    last = records[-1]
    return {"final_loss": last["loss"], "eq9": eq9[-1] if eq9 else None,
            "gamma_star": int(last["gamma_star"]), "bytes_sent": int(sum(last["bytes_sent"]))}


def evaluate_sets(ctx: Context, sets: list[dict], *, progress: bool = True,
                  device=None) -> None:
    """One row per sample set into ctx.rows (evaluate_samples against the preset's
    reference split, plus the cell's tags and a federated cell's last-round numbers), and
    its grid (one row per label) into ctx.grids. The classifier runs on `device` in fp32."""

    preset = ctx.preset
    extractor = get_extractor(preset.dataset, progress=progress, device=device)
    reference, _ = datasets.load(preset.dataset, split=preset.reference)
    reference_stats = extractor.stats(reference)
    ctx.classifier_accuracy = extractor.test_accuracy
    ctx.reference_size = int(reference.shape[0])
    (ctx.out / "grids").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sets):
        cell = preset.cells[s["cell"]]
        row = {"samples": s["label"], "cell": s["cell"]}
        if s["aggregator"] is not None:
            row["aggregator"] = s["aggregator"]
        row |= cell.tags
        row |= evaluate_samples(s["images"], s["labels"], extractor=extractor,
                                reference_stats=reference_stats,
                                reference_name=preset.reference)
        if "evals_per_step" in s:
            row["evals_per_step"] = s["evals_per_step"]
        if cell.kind == "federated":
            row |= federated_facts(ctx.trained[s["cell"]].path)
        if s.get("mixture") is not None:  # how decisively each trajectory settled on agents
            row["mixture_max_weight"] = float(s["mixture"].weights_now().max(1).values.mean())
        ctx.rows.append(row)
        ctx.grids[s["label"]] = image_grid(
            s["images"].clamp(-1, 1), ctx.out / "grids" / f"{i}-{_slug(s['label'])}.png",
            nrow=preset.sampling.per_label, title=f"{s['label']}: one row per label")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


# ---------------------------------------------------------------- the whole experiment


def run_experiment(preset: str | Path | Preset, out: str | Path, *, budget: str | None = None,
                   dataset: str | None = None, seed: int | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = True,
                   echo: Callable[[str], None] = print,
                   runtime: Runtime | None = None) -> ExperimentResult:
    """Run an experiment preset (a shipped name, a YAML path, or a resolved Preset) into
    `out`: train its cells, sample, evaluate, write report.md, report.html and results.json.
    budget, dataset, seed, overrides: as `load_preset`. echo: where the stage headings go.
    runtime: the device and precision every cell trains and samples on, chosen here once
    (default: the preset's `config: {device:, precision:}`, resolved; the classifier of
    the evaluation runs on the same device in fp32).
    Finished training in `out` of the same config is reused; sampling, evaluation and the
    report are redone."""

    if not isinstance(preset, Preset):
        name = preset
        preset = load_preset(name, budget=budget, dataset=dataset, seed=seed,
                             overrides=overrides)
        runtime = runtime or preset_runtime(preset)
        wanted = None if budget else preset.device_budgets.get(runtime.device.type)
        if wanted and wanted != preset.budget:  # e.g. the demo's longer budget on a GPU
            preset = load_preset(name, budget=wanted, dataset=dataset, seed=seed,
                                 overrides=overrides)
    info = datasets.info(preset.dataset)
    if len(info.shape) != 3:
        raise FedscoreError(f"experiment {preset.name!r} needs an image dataset (digits, "
                            f"mnist5k, ...), got {preset.dataset!r}")
    runtime = runtime or preset_runtime(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    stages = len(preset.cells) + 3
    trained: dict[str, Trained] = {}
    for i, (name, cell) in enumerate(preset.cells.items(), start=1):
        echo(f"[{i}/{stages}] {_describe(name, cell, preset)}")
        if cell.kind == "federated":
            trained[name] = train_federation(preset.cell_config(name, out), progress=progress,
                                             runtime=runtime)
        elif cell.kind == "central":
            trained[name] = train_central_cell(preset.cell_config(name, out),
                                               progress=progress, runtime=runtime)
        elif cell.kind == "agents":
            cfg = preset.cell_config(name, out)
            trained[name] = train_agents_cell(cfg, cell.regime, out / name, cell.n_agents,
                                              progress=progress, runtime=runtime)
        else:
            trained[name] = Trained()
        clock.lap(f"train {name}")
    if preset.same_silos is not None:
        fed, agents = preset.same_silos
        if not same_silos(trained[fed].path, trained[agents].path):
            raise FedscoreError(f"the agents of cell {agents!r} hold other silos than the "
                                f"federation {fed!r} (a partition bug)")
    ctx = Context(preset, out, trained)
    s = preset.sampling
    echo(f"[{stages - 2}/{stages}] sampling: {s.per_label} per label, {s.steps} {s.method} "
         "steps, the same noise for every set")
    sets = sample_sets(preset, trained, progress=progress, runtime=runtime)
    clock.lap("sampling")
    echo(f"[{stages - 1}/{stages}] evaluation with the {preset.dataset} classifier "
         f"(FID against the {preset.reference} split)")
    evaluate_sets(ctx, sets, progress=progress, device=runtime.device)
    clock.lap("evaluation")
    echo(f"[{stages}/{stages}] report")
    md, page = write_report(ctx, clock)
    return ExperimentResult(md, page, ctx.total, ctx.rows)


def preset_runtime(preset: Preset) -> Runtime:
    """The runtime a preset's shared `config` asks for (a cell cannot choose its own: one
    experiment runs on one device)."""
    names = [n for n, c in preset.cells.items() if c.kind != "real"]
    return from_config(preset.cell_config(names[0], "runs")) if names else CPU_FP32


def _describe(name: str, cell, preset: Preset) -> str:
    if cell.kind == "federated":
        fed = preset.cell_config(name, "runs").federation
        return (f"train {name}: {fed.workers} workers, {fed.policy} masks at level "
                f"{fed.level}, {fed.rounds} rounds x {fed.local_steps} local steps")
    if cell.kind == "central":
        t = preset.cell_config(name, "runs").train
        return (f"train {name}: one model on the pooled training split, {t.steps} steps of "
                f"batch {t.batch_size}")
    if cell.kind == "agents":
        steps = preset.cell_config(name, "runs").train.steps
        return (f"train {name}: FI agents ({cell.regime}), each alone on its partition, "
                f"{steps} steps each")
    return f"{name}: real {cell.split} images"
