"""`fedscore reproduce federated-inference`: the FI paper's experiment (its Table 1, Figure 2,
Tables 3-4), with the mixture aggregator beside the paper's mean.

Three regimes (FI §4.1: control, homogeneous, heterogeneous) of class-conditional agents,
each trained alone on its partition (`train_agents`). For every regime and aggregator
(mean, weighted by per-class counts, hybrid, mixture) N samples per label are drawn with
the exponential integrator (an SDE sampler: the mixture's Itô density estimator needs the
sampler's noise), all aggregators of a regime from the same initial noise and generator
seed, so their numbers are paired. Each set is scored with the dataset's domain classifier
(IS ± std, FID against the training split, unrecognisable fraction = max probability < 0.5,
class accuracy), drawn as a grid, and the paper's score diagnostics are tabulated. The
report says plainly whether `mixture` beats `mean` in the heterogeneous regime.

Budgets: the paper trained on a GPU; BUDGETS hold what fits this project's CPU. Every
agent gets the same number of optimiser steps (also the control agent, so it sees ten
times the data for the same compute, not ten times the compute).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.errors import FedscoreError, unknown
from fedscore.inference.agents import REGIMES, load_agents, train_agents
from fedscore.inference.aggregators import combine
from fedscore.inference.diagnostics import markdown_table, score_diagnostics, write_csv

AGGREGATOR_NAMES = ("mean", "weighted", "hybrid", "mixture")
SAMPLER = "exp-integrator"


@dataclass(frozen=True)
class Budget:
    """How much of the paper's setting is run (the paper: full MNIST, long GPU training)."""

    steps: int
    """Optimiser steps per agent (every agent, control included)."""
    batch_size: int
    lr: float
    n_agents: int
    n_per_label: int
    """Samples per label for each regime x aggregator (the paper: 10)."""
    sample_steps: int
    """Reverse steps of the exponential integrator (exponential grid)."""
    diag_inputs: int
    """Noise and real inputs per label for the diagnostics (the paper: 10 of each)."""
    model_options: dict = field(default_factory=dict)
    train_grid_steps: int = 100
    """Points of the training grid (eq. 9's held-out value is evaluated on every one)."""
    eval_batch: int = 64
    """Held-out batch on which each agent reports eq. 9."""
    preview_steps: int = 25
    """Sampler steps of each agent's own samples.png (train_central draws 10 per class)."""


BUDGETS: dict[str, Budget] = {
    # ~24 minutes for mnist5k on this project's 2-core CPU (measured 2026-11-22, BENCHMARKS.md):
    # 21 agents x 100 steps. Smoke scale: agents this brief draw no recognisable digits.
    "cpu": Budget(steps=100, batch_size=16, lr=2e-3, n_agents=10, n_per_label=5,
                  sample_steps=25, diag_inputs=10, model_options={"base": 16},
                  train_grid_steps=50, eval_batch=16, preview_steps=10),
    # seconds, for the test suite (use with dataset "digits").
    "quick": Budget(steps=4, batch_size=16, lr=2e-3, n_agents=10, n_per_label=2,
                    sample_steps=6, diag_inputs=2, model_options={"base": 8, "groups": 4},
                    train_grid_steps=10, eval_batch=8, preview_steps=4),
}


def base_config(dataset: str, out: Path, budget: Budget, seed: int):
    """The agents' RunConfig (class-conditional tiny U-Net, eps-parameterised DSM)."""
    from fedscore.runs.config import load_config

    return load_config(
        None, name="agents", out_dir=str(out), seed=seed, data={"name": dataset},
        model={"kind": "unet", "size": "tiny", "conditional": True,
               "options": dict(budget.model_options)},
        diffusion={"grid": "exponential", "steps": budget.train_grid_steps, "T": 5.0, "delta": 1e-3,
                   "weighting": "eps", "parameterisation": "eps"},
        train={"steps": budget.steps, "batch_size": budget.batch_size, "lr": budget.lr,
               "eval_batch": budget.eval_batch, "checkpoint_every": budget.steps,
               "log_every": max(1, budget.steps // 5)},
        sample={"method": SAMPLER, "grid": "exponential", "steps": budget.preview_steps,
                "n": 10 * budget.n_per_label},
    )


def sample_with(agents, aggregator: str, labels: Tensor, times: Tensor, shape, seed: int, *,
                method: str = SAMPLER, clip: bool = False, progress: bool = False):
    """(B, ...) samples for `labels` with K agents combined by `aggregator`; every
    aggregator starts from the same noise and generator state for the same seed. `clip`:
    each agent's denoised estimate clipped to [-1, 1] (diffusion.clip_denoised; the
    combination of clipped agents stays in range, its weights summing to one). Also returns
    the aggregator (the mixture's final weights are read from it)."""
    bound = agents.with_labels(labels)
    if clip:
        bound = diffusion.clip_denoised(bound)
    weights = agents.weights_for(labels) if aggregator != "mean" else None
    score_fn = combine(bound, aggregator, weights=weights)
    g = torch.Generator().manual_seed(seed)
    x_T = diffusion.prior((len(labels), *shape), generator=g)
    x = diffusion.sample(score_fn, x_T, times, method, generator=g, progress=progress)
    return x, score_fn


def sample_agents(run_dirs, out: str | Path, *, aggregator: str = "mixture",
                  per_label: int = 10, steps: int = 100, seed: int = 0,
                  progress: bool = True) -> dict[str, Path]:
    """Federated inference from trained agents' run folders: `per_label` samples of every
    label, the agents combined by `aggregator` at each of `steps` exponential-integrator
    steps on the agents' sampling grid (their config's `sample.grid` over [delta, T]).
    Writes `samples.npz` (as `fedscore sample` does, so `fedscore evaluate AGENT_DIR
    --samples` scores it) and `samples.png` (one row per label) into `out`; returns their
    paths."""
    from fedscore.runs.evaluate import FIGURE, SAMPLES, write_samples
    from fedscore.runs.plots import image_grid
    from fedscore.runs.sampling import sampling_grid

    if aggregator not in AGGREGATOR_NAMES:
        raise unknown("aggregator", aggregator, AGGREGATOR_NAMES)
    if per_label < 1 or steps < 1:
        raise FedscoreError(f"per_label and steps must be positive, got {per_label}, {steps}")
    agents = load_agents(run_dirs)
    cfg = agents.config
    info = datasets.info(cfg.data.name)
    labels = torch.arange(info.classes).repeat_interleave(per_label)
    times = sampling_grid(cfg.model_copy(update={"sample": cfg.sample.model_copy(
        update={"steps": steps})}))
    x, _ = sample_with(agents, aggregator, labels, times, tuple(info.shape), seed,
                       progress=progress)
    out = Path(out)
    npz = write_samples(out / SAMPLES, x, labels, seed)
    figure = image_grid(x.clamp(-1, 1), out / FIGURE, nrow=per_label,
                        title=f"federated inference ({aggregator}, {len(run_dirs)} agents): "
                              "one row per label")
    return {"samples": npz, "figure": Path(figure)}


def evaluate(images: Tensor, labels: Tensor, extractor, real_stats) -> dict:
    """The FI paper's Table 1 numbers and its "noise" fraction for one sample set."""
    from fedscore.metrics import (
        class_accuracy,
        fid_from_stats,
        inception_score,
        unrecognisable_fraction,
    )

    bad = ~torch.isfinite(images.flatten(1)).all(1)
    images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    logits = extractor.logits(images)
    is_mean, is_std = inception_score(logits, splits=min(10, max(1, len(images) // 2)))
    return {
        "is_mean": is_mean, "is_std": is_std,
        "fid": fid_from_stats(real_stats, extractor.stats(images)),
        "unrecognisable": unrecognisable_fraction(logits),
        "class_accuracy": class_accuracy(logits, labels),
        "non_finite": int(bad.sum()),
    }


def diagnostics_inputs(dataset: str, n: int, shape, classes: int, seed: int,
                       data_root: str | None = None) -> dict:
    """Per label: n pure-noise inputs and n real test images of that label (FI §4.3)."""
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
) -> Path:
    """FI eqs. 9-13 for trained agents (`fedscore agents diagnose`): per label and t in
    {1, 0.5, 0.1, 0.01} (fractions of T), on n_inputs noise and n_inputs real test images,
    the aggregate's magnitude and the agents' cosine to it. Writes out/diagnostics-
    <aggregator>.csv and .md (a table laid out like the paper's); returns the .md path.
    Weighted aggregators use the agents' per-class counts of each input's label."""
    agents = load_agents(run_dirs)
    cfg = agents.config
    info = datasets.info(cfg.data.name)
    if len(info.shape) != 3:
        raise FedscoreError(f"score diagnostics need an image dataset, got {cfg.data.name!r}")
    inputs = diagnostics_inputs(cfg.data.name, n_inputs, tuple(info.shape), info.classes, seed,
                                cfg.data.data_root)
    T = float(diffusion.time_grid(**cfg.diffusion.grid_kwargs())[0])  # also ddpm-linear's
    records = score_diagnostics(
        agents, inputs, T=T, aggregator=aggregator,
        weights=None if aggregator == "mean" else agents.weights_for)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / f"diagnostics-{aggregator}.csv")
    md = out / f"diagnostics-{aggregator}.md"
    md.write_text(f"# Score diagnostics ({aggregator}, {agents.n_agents} agents)\n\n"
                  + markdown_table(records) + "\n")
    return md


def reproduce_federated_inference(
    dataset: str = "mnist5k", out: str | Path = Path("runs/federated-inference"), *,
    budget: str | Budget = "cpu", seed: int = 0, progress: bool = True,
) -> Path:
    """Train the three regimes, sample with every aggregator, evaluate, write report.md
    (returned) beside results.json, grids/ and diagnostics/. Finished agents are reused."""
    from fedscore.metrics import get_extractor
    from fedscore.runs.plots import image_grid

    t0 = time.perf_counter()
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise unknown("budget", budget, BUDGETS)
        name, b = budget, BUDGETS[budget]
    else:
        name, b = "custom", budget
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    (out / "diagnostics").mkdir(exist_ok=True)
    cfg = base_config(dataset, out, b, seed)
    info = datasets.info(dataset)
    if len(info.shape) != 3:
        raise FedscoreError(f"the federated-inference reproduction needs an image dataset "
                            f"(digits, mnist5k, ...), got {dataset!r}")
    shape, classes = tuple(info.shape), info.classes
    extractor = get_extractor(dataset, progress=progress)
    real, _ = datasets.load(dataset, split="train")
    real_stats = extractor.stats(real)
    labels = torch.arange(classes).repeat_interleave(b.n_per_label)
    times = diffusion.time_grid("exponential", b.sample_steps, T=cfg.diffusion.T,
                                delta=cfg.diffusion.delta)
    rows, diag, agent_counts = [], {}, {}
    inputs = diagnostics_inputs(dataset, b.diag_inputs, shape, classes, seed)
    for regime in REGIMES:
        dirs = train_agents(cfg, regime, out / regime, n_agents=b.n_agents, progress=progress)
        agents = load_agents(dirs)
        agent_counts[regime] = agents.counts.tolist()
        names = ("mean",) if regime == "control" else AGGREGATOR_NAMES
        for agg in names:
            x, score_fn = sample_with(agents, agg, labels, times, shape, seed=1000 + seed)
            row = {"regime": regime, "aggregator": "single agent" if regime == "control"
                   else agg, **evaluate(x, labels, extractor, real_stats)}
            if agg == "mixture":  # how decisively each trajectory settled on agents
                row["mixture_max_weight"] = float(score_fn.weights_now().max(1).values.mean())
            rows.append(row)
            tag = f"{regime}-{'single' if regime == 'control' else agg}"
            image_grid(x.clamp(-1, 1), out / "grids" / f"{tag}.png", nrow=b.n_per_label,
                       title=f"{regime}, {row['aggregator']}: one row per label")
        if regime != "control":
            records = score_diagnostics(agents, inputs, T=float(cfg.diffusion.T),
                                        aggregator="mean")
            write_csv(records, out / "diagnostics" / f"{regime}-mean.csv")
            diag[regime] = markdown_table(records)
    seconds = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(
        {"dataset": dataset, "budget": {"name": name, **asdict(b)}, "seed": seed,
         "sampler": SAMPLER, "rows": rows, "class_counts": agent_counts,
         "seconds": seconds}, indent=2))
    report = out / "report.md"
    report.write_text(render_report(dataset, name, b, rows, diag, agent_counts, seconds,
                                    extractor.test_accuracy))
    return report


def _find(rows, regime, agg):
    return next(r for r in rows if r["regime"] == regime and r["aggregator"] == agg)


def verdict(rows: list[dict]) -> list[str]:
    """Plain sentences: does `mixture` beat `mean` in the heterogeneous regime?"""
    mean, mix = _find(rows, "heterogeneous", "mean"), _find(rows, "heterogeneous", "mixture")
    fid = mix["fid"] < mean["fid"]
    unr = mix["unrecognisable"] < mean["unrecognisable"]
    return [
        f"- FID (lower is better): `mixture` **{'beats' if fid else 'does not beat'}** "
        f"`mean` ({mix['fid']:.2f} vs {mean['fid']:.2f}).",
        f"- Unrecognisable fraction (lower is better): `mixture` "
        f"**{'beats' if unr else 'does not beat'}** `mean` "
        f"({mix['unrecognisable']:.3f} vs {mean['unrecognisable']:.3f}).",
    ]


def _fmt(v, spec):
    return "nan" if isinstance(v, float) and not math.isfinite(v) else format(v, spec)


def render_report(dataset, budget_name, b: Budget, rows, diag, counts, seconds,
                  classifier_acc) -> str:
    lines = [
        f"# Federated inference on {dataset}: the paper's mean and the mixture score", "",
        "## Setting", "",
        f"- Budget `{budget_name}`: {b.steps} optimiser steps per agent (batch {b.batch_size}, "
        f"Adam lr {b.lr}), tiny class-conditional U-Net {b.model_options or ''}, "
        f"{b.n_agents} agents per federated regime; the paper trained to convergence on "
        "a GPU, so absolute numbers here are those of briefly trained agents.",
        f"- Sampling: `{SAMPLER}`, {b.sample_steps} steps on the exponential grid, "
        f"{b.n_per_label} samples per label, the same initial noise and seed "
        "for every aggregator of a regime.",
        f"- Metrics from the domain classifier (held-out accuracy {classifier_acc:.3f}): "
        "FID against the training split (biased upward at this sample size, compare rows "
        "only), IS ± std over splits, unrecognisable = max class probability < 0.5 "
        "(the paper's \"noise\" samples), class accuracy = fraction read as the "
        "requested label.",
        f"- Wall time: {seconds:.0f} s with {torch.get_num_threads()} torch thread(s).", "",
        "## Results (FI Table 1)", "",
        "| regime | aggregator | IS ± std | FID | unrecognisable | class accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['aggregator']} | {_fmt(r['is_mean'], '.2f')} ± "
            f"{_fmt(r['is_std'], '.2f')} | {_fmt(r['fid'], '.2f')} | "
            f"{r['unrecognisable']:.3f} | {r['class_accuracy']:.3f} |")
    bad = sum(r["non_finite"] for r in rows)
    if bad:
        lines += ["", f"{bad} samples were not finite (set to 0 before scoring)."]
    lines += ["", "## Verdict: mixture vs mean, heterogeneous regime", "", *verdict(rows)]
    control = _find(rows, "control", "single agent")["class_accuracy"]
    if control < 0.5:
        lines.append(
            f"- Caution: the control agent's own samples are read as the requested digit only "
            f"{control:.0%} of the time, so these agents are too briefly trained for the "
            "numbers above to rank the aggregators; rerun with a larger budget.")
    mix = _find(rows, "heterogeneous", "mixture")
    lines += [
        f"- The mixture's final weights put on average {mix['mixture_max_weight']:.2f} on "
        "each trajectory's heaviest agent (1 = settled on one agent, 1/K = undecided).", "",
        "## Sample grids (FI Figure 2)", "",
    ]
    for r in rows:
        tag = f"{r['regime']}-{'single' if r['regime'] == 'control' else r['aggregator']}"
        lines.append(f"![{r['regime']}, {r['aggregator']}](grids/{tag}.png)")
    lines += ["", "## Score diagnostics (FI eqs. 9-13, Tables 3-4; aggregator `mean`)", "",
              "Mean magnitude of the averaged score and mean cosine of each agent's score to "
              "it, per label, on pure noise and on real test images; t as a fraction of T.", ""]
    for regime, table in diag.items():
        lines += [f"### {regime}", "", table, ""]
    lines += ["## Agents' class counts (all the server learns of their data)", ""]
    for regime, c in counts.items():
        lines.append(f"- {regime}: " + "; ".join(
            f"agent {j}: {row}" for j, row in enumerate(c)))
    return "\n".join(lines) + "\n"
