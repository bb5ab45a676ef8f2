"""`fedscore demo`: the main job on the bundled mnist5k digits, end to end, in one report.

Ten silos hold the FI paper's heterogeneous split of the 4,000 training digits (`dominant`:
silo j holds 50% digit j, 50% evenly the other nine). The same ten silos collaborate in the
two ways of the two papers:

1. federated training with pruning (eqs. 7-8): one class-conditional tiny U-Net, top-k
   masks at level M (six workers full, two keep 80%, two keep 75%), `train_federated`;
2. federated inference (FI paper): ten agents, each trained alone on its silo
   (`train_agents`, regime "heterogeneous" = the same partition, same seed), combined at
   every reverse step by `mean` (the paper) and `mixture` (the agents' true mixture).

All three sample sets are class-conditional, drawn by DDPM's ancestral sampler (an SDE
sampler, as the mixture's Itô density tracking needs) with the denoised estimate clipped to
the pixel range at every step (`diffusion.clip_denoised`), from the SAME initial noise and
generator seed, and scored by the project's mnist5k classifier: FID against the held-out test
split, IS, class accuracy and the recognisable fraction (max class probability >= 0.5, the
complement of the FI paper's "noise" samples). Real training digits scored the same way give
the floor each number can reach at this sample size.

Why `dominant` and not iid: the point of the demo is the two papers' answers to one
question, how ten silos that may not pool data get one generative model, so both answers
must see the same silos, and the FI paper's own heterogeneous regime is where the choice
of aggregator (mean vs mixture) matters.

How the full budget was chosen (2-core CPU, 2026-11-30, class accuracy of 100 samples):
the federation is what must make digits, so it gets most of the 15 minutes. Each worker
step costs about as much at batch 4 as at 8 (small convolutions are overhead-bound), and
ten vmapped workers at batch 8 with a base-16 tiny U-Net run a 10-step round in ~7.3 s.
After 50 rounds the global model's samples were read as the requested digit 29% of the
time, after 80 rounds 49% (clipped ancestral sampler; unclipped samplers 11-22%, many
samples ending as all-black or all-white squares). Evaluating held-out eq. 9 every 10th
round instead of every round saves ~1.3 s a round. The agents get what is left: at 50
steps each they do not draw digits, which the report says. Numbers: BENCHMARKS.md, "The demo's
budget" (benchmarks/demo_budget.py).

Resuming: a run folder of the same budget keeps its finished or interrupted training stages
(the federation resumes from its per-round checkpoint, finished agents are kept); sampling,
evaluation and the report are redone (about a minute).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.errors import FedscoreError, unknown

DATASET = "mnist5k"
PARTITION = "dominant"  # FI §4.1 heterogeneous; the module docstring says why
POLICY, LEVEL = "topk", "M"
SAMPLER = "ancestral"  # SDE sampler: the mixture aggregator tracks densities with its noise
RECOGNISABLE_FLOOR = 0.35
"""Class accuracy the federated model's samples must reach to count as recognisable digits
(chance is 0.1; the full budget measured 0.49, see the module docstring); the report says
whether this run met it."""


@dataclass(frozen=True)
class Budget:
    """How much the demo trains and samples (the papers trained for hours on GPUs)."""

    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    """Federation: Q rounds of S local Adam steps at this batch and learning rate."""
    agent_steps: int
    agent_batch: int
    agent_lr: float
    """Each FI agent: this many Adam steps alone on its silo."""
    n_per_label: int
    """Samples per digit for each of the three sample sets."""
    sample_steps: int
    """Ancestral-sampler steps on the exponential grid."""
    model_options: dict = field(default_factory=dict)
    """Keyword arguments of the tiny U-Net (e.g. its width `base`)."""
    adam_state: str = "keep"
    grid_steps: int = 50
    """Training grid points; eq. 9's held-out value is evaluated on every one of them."""
    eval_batch: int = 8
    """Held-out test images for eq. 9."""
    eval_every: int = 10
    """Rounds between held-out eq. 9 evaluations (one costs ~1.3 s, a fifth of a round)."""
    agent_ema: float | None = None
    preview_steps: int = 4
    """Sampler steps of each agent's own samples.png (train_central draws 100 per agent)."""
    workers: int = 10
    strategy: str = "vmap"
    """How the round engine runs the workers. For ten tiny U-Net workers at batch 4, 10 local
    steps, one round took 9.0 s with vmap, 10.4 s sequential, 11.2 s with "auto" (2 cores,
    2026-11-30), hence vmap."""


BUDGETS: dict[str, Budget] = {
    # about 14 minutes on an idle 2-core CPU (README has the time measured on a fresh clone).
    "full": Budget(rounds=80, local_steps=10, batch_size=8, lr=2e-3,
                   agent_steps=50, agent_batch=16, agent_lr=2e-3,
                   n_per_label=10, sample_steps=25, model_options={"base": 16}),
    # under two minutes: the same code path and report, at a smoke-test scale.
    "quick": Budget(rounds=2, local_steps=1, batch_size=4, lr=2e-3,
                    agent_steps=2, agent_batch=4, agent_lr=2e-3,
                    n_per_label=1, sample_steps=4, grid_steps=10, eval_batch=2, eval_every=1,
                    model_options={"base": 8, "groups": 4}, preview_steps=2),
}


# ---------------------------------------------------------------- configs


def _common(b: Budget, out: Path, seed: int) -> dict:
    """What the federation and the agents share: data, model, diffusion (so they compare)."""
    return {
        "seed": seed, "out_dir": str(out), "data": {"name": DATASET},
        "model": {"kind": "unet", "size": "tiny", "conditional": True,
                  "options": dict(b.model_options)},
        "diffusion": {"grid": "exponential", "steps": b.grid_steps, "T": 5.0, "delta": 1e-3,
                      "parameterisation": "eps", "weighting": "eps"},
    }


def federation_config(b: Budget, out: Path, seed: int = 0):
    """The federated run's RunConfig: 10 workers, top-k masks at level M, dominant silos."""
    from fedscore.runs.config import load_config

    return load_config(
        None, name="federated", **_common(b, out, seed),
        train={"eval_batch": b.eval_batch},
        sample={"method": SAMPLER, "grid": "exponential", "steps": b.sample_steps,
                "n": 10 * b.n_per_label, "clip_denoised": True},
        federation={"workers": b.workers, "rounds": b.rounds, "local_steps": b.local_steps,
                    "batch_size": b.batch_size, "lr": b.lr, "optimizer": "adam",
                    "adam_state": b.adam_state, "policy": POLICY, "level": LEVEL,
                    "strategy": b.strategy, "eval_every": b.eval_every,
                    "uncovered": "keep", "partition": {"scheme": PARTITION}},
    )


def agents_config(b: Budget, out: Path, seed: int = 0):
    """The FI agents' RunConfig (each trains alone; train_agents picks its silo)."""
    from fedscore.runs.config import load_config

    return load_config(
        None, name="agents", **_common(b, out, seed),
        train={"steps": b.agent_steps, "batch_size": b.agent_batch, "lr": b.agent_lr,
               "ema_decay": b.agent_ema, "eval_batch": b.eval_batch,
               "checkpoint_every": b.agent_steps, "log_every": max(1, b.agent_steps // 20)},
        sample={"method": SAMPLER, "grid": "exponential", "steps": b.preview_steps, "n": 10,
                "clip_denoised": True},
    )


# ---------------------------------------------------------------- stages


def _same_config(path: Path, cfg) -> bool:
    from fedscore.runs.config import dump_config

    kept = path / "config.yaml"
    return kept.is_file() and kept.read_text() == dump_config(cfg)


def train_federation(cfg, *, progress: bool = True):
    """Stage 1: the federated global model (eqs. 7-8). A finished run of the same config is
    loaded, an interrupted one resumed. Returns (model, reused?)."""
    from fedscore.runs.federated import train_federated
    from fedscore.runs.train import load_model

    path = cfg.run_dir()
    if (path / "config.yaml").is_file() and not _same_config(path, cfg):
        raise FedscoreError(
            f"{str(path)!r} holds a federated run of another budget; choose another --out "
            "folder or remove it"
        )
    if (path / "model.safetensors").is_file():
        return load_model(path)[0], True
    resume = (path / "checkpoint.safetensors").is_file()
    return train_federated(cfg, resume=resume, progress=progress).model.eval(), False


def same_silos(fed_dir: Path, agents_dir: Path) -> bool:
    """Do the agents hold exactly the federation's silos? (class counts per silo)"""
    fed = json.loads((fed_dir / "partition.json").read_text())["class_histogram"]
    agents = [a["class_counts"] for a in
              json.loads((agents_dir / "agents.json").read_text())["agents"]]
    return fed == agents


def draw(score_fn, labels: Tensor, times: Tensor, shape: tuple[int, ...], seed: int, *,
         progress: bool = True) -> Tensor:
    """(B, *shape) samples for `labels` (B,): every sample set starts from the same noise
    and generator state for the same seed, so the three sets are paired."""
    g = torch.Generator().manual_seed(seed)
    x_T = diffusion.prior((len(labels), *shape), generator=g)
    return diffusion.sample(diffusion.clip_denoised(score_fn), x_T, times, SAMPLER, generator=g,
                            progress=progress)


def real_reference(n_per_label: int, seed: int) -> tuple[Tensor, Tensor]:
    """n_per_label real training digits per label: what the metrics give real data at the
    samples' size (FID at 100 samples is far above 0 even for real digits)."""
    images, labels = datasets.load(DATASET, split="train")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.nonzero(labels == c).flatten() for c in range(10)]
    pick = torch.cat([r[torch.randperm(len(r), generator=g)[:n_per_label]] for r in rows])
    return images[pick], labels[pick]


class Stopwatch:
    """Wall seconds per named stage, in order."""

    def __init__(self):
        self.start = time.perf_counter()
        self.laps: dict[str, float] = {}
        self._t = self.start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now
        return self.laps[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------- the whole job


@dataclass
class DemoResult:
    report: Path
    html: Path
    seconds: float
    rows: list[dict]


def run_demo(out: str | Path = Path("runs/demo"), *, quick: bool = False,
             budget: str | Budget | None = None, seed: int = 0, progress: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Train the federation and the agents, sample, evaluate, write report.md and
    report.html into `out`. budget: a name of BUDGETS or a Budget (default "quick" when
    quick, else "full"). echo: where the stage headings go."""
    from fedscore.demo.report import write_report
    from fedscore.federated.setup import keep_ratios
    from fedscore.inference import load_agents, train_agents
    from fedscore.inference.experiment import evaluate, sample_with
    from fedscore.metrics import get_extractor
    from fedscore.runs.plots import image_grid
    from fedscore.runs.sampling import model_score_fn, sampling_grid

    budget = budget or ("quick" if quick else "full")
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise unknown("demo budget", budget, BUDGETS)
        name, b = budget, BUDGETS[budget]
    else:
        name, b = "custom", budget
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    reused: dict[str, bool] = {}

    echo(f"[1/5] federated training: {b.workers} workers, top-k masks at level {LEVEL}, "
         f"{b.rounds} rounds x {b.local_steps} local steps")
    fed_cfg = federation_config(b, out, seed)
    model, reused["federated training"] = train_federation(fed_cfg, progress=progress)
    clock.lap("federated training")

    echo(f"[2/5] federated inference: {b.workers} agents, each alone on its silo, "
         f"{b.agent_steps} steps each")
    ag_cfg = agents_config(b, out, seed)
    done = all((out / "agents" / f"agent-{j:02d}" / "model.safetensors").is_file()
               for j in range(b.workers))
    dirs = train_agents(ag_cfg, "heterogeneous", out / "agents", n_agents=b.workers,
                        progress=progress)
    reused["agents"] = done
    if not same_silos(fed_cfg.run_dir(), out / "agents"):
        raise FedscoreError("the agents' silos differ from the federation's (partition bug)")
    agents = load_agents(dirs)
    clock.lap("agents")

    echo(f"[3/5] sampling: {b.n_per_label} per digit, {b.sample_steps} ancestral steps, "
         "same noise for all three")
    info = datasets.info(DATASET)
    shape = tuple(info.shape)
    labels = torch.arange(info.classes).repeat_interleave(b.n_per_label)
    times = sampling_grid(fed_cfg)  # its sample section holds the budget's grid and steps
    sample_seed = 1000 + seed
    sets = {"federated model": draw(model_score_fn(model, fed_cfg, labels), labels, times,
                                    shape, sample_seed, progress=progress)}
    for agg in ("mean", "mixture"):  # sample_with: same noise as `draw` for the same seed
        sets[f"federated inference, {agg}"], mixture = sample_with(
            agents, agg, labels, times, shape, sample_seed, method=SAMPLER, clip=True,
            progress=progress)
    clock.lap("sampling")

    echo("[4/5] evaluation with the mnist5k classifier (trained once on first use, cached)")
    extractor = get_extractor(DATASET, progress=progress)
    test_images, _ = datasets.load(DATASET, split="test")
    held_out = extractor.stats(test_images)
    real_x, real_y = real_reference(b.n_per_label, seed)
    rows = []
    grids = {}
    for i, (what, x) in enumerate([*sets.items(), ("real training digits", real_x)]):
        row = {"samples": what, **evaluate(x, labels if what != "real training digits"
                                           else real_y, extractor, held_out)}
        row["recognisable"] = 1.0 - row.pop("unrecognisable")
        rows.append(row)
        grids[what] = image_grid(x.clamp(-1, 1), out / "grids" / f"{i}-{_slug(what)}.png",
                                 nrow=b.n_per_label, title=f"{what}: one row per digit")
    by_name = {r["samples"]: r for r in rows}
    by_name["federated inference, mixture"]["mixture_max_weight"] = float(
        mixture.weights_now().max(1).values.mean())
    clock.lap("evaluation")

    echo("[5/5] report")
    facts = {
        "budget_name": name, "budget": asdict(b), "seed": seed,
        "threads": torch.get_num_threads(), "classifier_accuracy": extractor.test_accuracy,
        "n_params": sum(p.numel() for p in model.parameters()), "reused": reused,
        "agent_counts": agents.counts.tolist(), "floor": RECOGNISABLE_FLOOR,
        "test_size": int(test_images.shape[0]), "level": LEVEL,
        "keep_ratios": keep_ratios(fed_cfg.federation),
    }
    result = write_report(out, rows=rows, grids=grids, facts=facts, clock=clock)
    return DemoResult(result[0], result[1], clock.total, rows)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")
