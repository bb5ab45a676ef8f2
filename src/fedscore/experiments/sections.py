"""The report of every experiment, assembled in one order from one set of parts:

intro (the experiment's prose) -> Results (one metric table, one paragraph on how the
numbers were measured) -> Verdict (the experiment's sentences) -> Samples (the grids) ->
the preset's optional sections (training loss, score diagnostics, pruning statistics, the
silos) -> Timings -> Files; rendered as report.md and report.html beside results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedscore import data as datasets
from fedscore.experiments.agents import diagnostics_inputs
from fedscore.experiments.figures import loss_figure, pruning_figure
from fedscore.experiments.prose import PROSE
from fedscore.experiments.report import (
    Block,
    fmt,
    metric_table,
    seconds_text,
    to_html,
    to_markdown,
)
from fedscore.federated.setup import keep_ratios
from fedscore.inference.diagnostics import markdown_table, score_diagnostics, write_csv
from fedscore.io import atomic_write_text
from fedscore.runs.evaluate import json_safe
from fedscore.runs.folder import RunFolder


def _records(path: Path) -> list[dict]:

    return RunFolder(path).metrics()


def _cells(ctx, kind: str) -> dict:
    return {n: c for n, c in ctx.preset.cells.items() if c.kind == kind}


# ---------------------------------------------------------------- always there


def results(ctx) -> list[Block]:
    p, s = ctx.preset, ctx.preset.sampling
    rows = ctx.rows
    n = rows[0]["n_samples"]
    bad = sum(r["non_finite"] for r in rows)
    text = (
        f"{n} samples per row ({s.per_label} per label), every generated set from the same "
        f"initial noise: `{s.method}`, {s.steps} steps on the {s.grid} grid"
        f"{', denoised estimate clipped to the pixel range' if s.clip else ''}. Scored by "
        f"the project's {p.dataset} classifier (held-out accuracy "
        f"{ctx.classifier_accuracy:.3f}): FID of its features against the "
        f"{ctx.reference_size:,} images of the **{p.reference} split**; IS ± std over "
        f"{rows[0]['is_splits']} split(s) (the papers' 10, but never fewer than 20 samples "
        "per split); class accuracy = fraction read as the requested label; unrecognisable "
        "= max class probability < 0.5 (the FI paper's \"noise\" samples; recognisable is "
        f"its complement). FID is biased upward at {n} samples: compare rows, not papers.")
    for cell in p.cells.values():
        if cell.kind == "real":
            text += (f" The {cell.label} row is what real images score at this sample size: "
                     "the floor each number can reach.")
    blocks: list[Block] = [("h2", "Results"), metric_table(rows, p.columns), ("p", text)]
    if bad:
        blocks.append(("p", f"{bad} samples were not finite (set to 0 before scoring)."))
    return blocks


def samples(ctx) -> list[Block]:
    blocks: list[Block] = [("h2", "Samples")]
    for what, path in ctx.grids.items():
        blocks += [("h3", what), ("img", f"samples: {what}", path.relative_to(ctx.out).as_posix())]
    return blocks


def timings(ctx) -> list[Block]:
    reused = {f"train {n}" for n, t in ctx.trained.items() if t.reused}
    return [("h2", "Timings"), ("table", ["stage", "wall time"], [
        [k + (" (reused from an earlier run)" if k in reused else ""), seconds_text(v)]
        for k, v in ctx.laps.items()] + [["**total**", f"**{seconds_text(ctx.total)}**"]])]


def files(ctx) -> list[Block]:
    what = {"federated": "a federated run folder (config.yaml, metrics.jsonl with one record "
                         "per round, model.safetensors, partition.png)",
            "central": "a run folder (config.yaml, metrics.jsonl with one record per "
                       "logged step, model.safetensors, samples.png)",
            "agents": "one run folder per FI agent in `agent-*` (class_counts.json, "
                      "metrics.jsonl, model.safetensors, samples.png)"}
    items = _grouped({f"{n}/": what[c.kind] for n, c in ctx.preset.cells.items()
                      if c.kind in what})
    items.append("`grids/`: the sample grids; `results.json`: every number above")
    return [("h2", "Files"), ("ul", items)]


def _grouped(texts: dict[str, str]) -> list[str]:
    """name -> text as one line per distinct text: "`a`, `b`: text" (eight cells of one
    budget are described once)."""
    names: dict[str, list[str]] = {}
    for name, text in texts.items():
        names.setdefault(text, []).append(f"`{name}`")
    return [f"{', '.join(ns)}: {text}" for text, ns in names.items()]


# ---------------------------------------------------------------- chosen by the preset


def loss(ctx) -> list[Block]:
    """The training loss: federated cells grouped by their panel, then each central cell
    and each agents cell (per optimiser step)."""

    fed: dict[str, dict[str, list[dict]]] = {}
    for name, cell in _cells(ctx, "federated").items():
        fed.setdefault(cell.panel or name, {})[cell.label] = _records(ctx.trained[name].path)
    steps = {f"{name}: one model on the pooled data": {cell.label: _records(
        ctx.trained[name].path)} for name, cell in _cells(ctx, "central").items()}
    steps |= {f"{name}: each agent alone on its partition": {
        p.name: _records(p) for p in sorted(ctx.trained[name].path.glob("agent-*"))}
        for name in _cells(ctx, "agents")}
    path = loss_figure(fed, steps, ctx.out / "loss.png")
    return [("h2", "Training loss"), ("p", _training_text(ctx)),
            ("img", "training loss", path.name)]


def _training_text(ctx) -> str:
    texts = {}
    for name in _cells(ctx, "federated"):
        cfg = ctx.trained[name].cfg
        f = cfg.federation
        texts[name] = (
            f"{f.workers} workers, {f.rounds} rounds x {f.local_steps} local {f.optimizer} "
            f"steps (batch {f.batch_size}, lr {f.lr:g}), held-out eq. 9 every "
            f"{f.eval_every} round(s) on {cfg.train.eval_batch} test images over the "
            f"{cfg.diffusion.steps}-point training grid.")
    for name in _cells(ctx, "central"):
        t = ctx.trained[name].cfg.train
        texts[name] = (f"{t.steps} Adam steps (batch {t.batch_size}, lr {t.lr:g}) on the "
                       "whole training split, the data no silo may share.")
    for name in _cells(ctx, "agents"):
        t = ctx.trained[name].cfg.train
        texts[name] = (f"{t.steps} Adam steps per agent (batch {t.batch_size}, lr {t.lr:g}) "
                       "on its own partition only.")
    return " ".join(_grouped(texts))


def pruning_summary(records: list[dict]) -> dict:
    """What eqs. 7-8 did over a federated run, from its per-round records
    (fedscore.federated.aggregate.round_stats): final Gamma*, per-worker keep fractions,
    the last round's coverage histogram, uncovered coordinates over all rounds, max w^2,
    and bytes per round (up: summed over workers; dense: what FedAvg would send)."""
    if not records:
        raise ValueError("no federated rounds recorded")
    last = records[-1]
    n = len(last["keep_fraction"])
    up = sum(sum(r["bytes_sent"]) for r in records) / len(records)
    dense = n * last["bytes_received"]
    return {
        "rounds": len(records),
        "gamma_star": int(last["gamma_star"]),
        "keep_fraction": [float(k) for k in last["keep_fraction"]],
        "coverage_hist": [int(c) for c in last["coverage_hist"]],
        "uncovered_total": int(sum(r["uncovered"] for r in records)),
        "w2_max": float(max(r["w2"] for r in records)),
        "bytes_up_per_round": up,
        "bytes_dense_per_round": dense,
        "bytes_down_per_round": dense,
        "upload_saving": 1.0 - up / dense if dense else 0.0,
    }


def pruning_statistics(ctx) -> list[Block]:
    """Per federated cell: what the masks kept, Gamma*, coverage, bytes (a table and a
    figure); the numbers go to results.json under `pruning`."""

    blocks: list[Block] = [("h2", "Pruning statistics")]
    cells = _cells(ctx, "federated")
    for name in cells:
        t = ctx.trained[name]
        records = _records(t.path)
        s = pruning_summary(records)
        ctx.data.setdefault("pruning", {})[name] = s
        n, level = len(s["keep_fraction"]), t.cfg.federation.level
        if len(cells) > 1:
            blocks.append(("h3", name))
        blocks += [("table", ["statistic", "value"], [
            [f"keep ratio per worker (level {level})",
             ", ".join(f"{r:g}" for r in keep_ratios(t.cfg.federation))],
            ["measured keep fraction per worker",
             ", ".join(f"{k:.3f}" for k in s["keep_fraction"])],
            ["Γ* = min over rounds and coordinates of the workers that kept it",
             str(s["gamma_star"])],
            [f"coordinates kept by c = 0..{n} workers (last round)",
             ", ".join(map(str, s["coverage_hist"]))],
            ["uncovered coordinates (kept by nobody; sum over rounds)",
             str(s["uncovered_total"])],
            ["w² = max pruned share of ||θ||² (max over rounds)", fmt(s["w2_max"], ".4f")],
            ["bytes up per round, all workers (values + packed mask bits)",
             f"{s['bytes_up_per_round']:,.0f}"],
            ["bytes up per round with dense FedAvg", f"{s['bytes_dense_per_round']:,.0f}"],
            ["upload saved by pruning", f"{s['upload_saving']:.1%}"],
            ["bytes down per round (θ_q to every worker)", f"{s['bytes_down_per_round']:,.0f}"],
        ]), ("img", f"pruning statistics: {name}", pruning_figure(
            records, ctx.out / f"pruning-{name}.png",
            f"{t.cfg.federation.policy}, level {level}").name)]
    return blocks


def diagnostics(ctx) -> list[Block]:
    """FI eqs. 9-13 (the paper's Tables 3-4, aggregator `mean`) per agents cell of more
    than one agent, on noise and real test inputs; CSVs in diagnostics/."""

    p = ctx.preset
    info = datasets.info(p.dataset)
    inputs = diagnostics_inputs(p.dataset, p.diagnostic_inputs, tuple(info.shape),
                                info.classes, p.seed)
    (ctx.out / "diagnostics").mkdir(exist_ok=True)
    blocks: list[Block] = [
        ("h2", "Score diagnostics (FI eqs. 9-13, Tables 3-4; aggregator `mean`)"),
        ("p", "Mean magnitude of the averaged score and mean cosine of each agent's score to "
              "it, per label, on pure noise and on real test images; t as a fraction of T.")]
    for name in _cells(ctx, "agents"):
        t = ctx.trained[name]
        if t.agents.n_agents < 2:
            continue
        records = score_diagnostics(t.agents, inputs, T=float(t.cfg.diffusion.T),
                                    aggregator="mean")
        write_csv(records, ctx.out / "diagnostics" / f"{name}-mean.csv")
        blocks += [("h3", name), _table(markdown_table(records))]
    return blocks


def _table(markdown: str) -> Block:
    """A markdown table (header, rule, rows) as a table block, so HTML renders it too."""
    header, _, *rows = markdown.splitlines()

    def cells(line: str) -> list[str]:
        return line.strip().strip("|").strip().split(" | ")

    return ("table", cells(header), [cells(r) for r in rows])


def silos(ctx) -> list[Block]:
    """Class counts per agent of every agents cell: all the server learns of their data."""
    blocks: list[Block] = [("h2", "The silos"), ("p", (
        "Class counts per silo (rows: silo; columns: label), all the server learns of a "
        "silo's data." + _same_silos_text(ctx.preset.same_silos)))]
    counts = {}
    for name in _cells(ctx, "agents"):
        c = ctx.trained[name].agents.counts.tolist()
        counts[name] = c
        blocks += [("h3", name), ("table", ["silo", *map(str, range(len(c[0])))],
                                  [[str(j), *map(str, row)] for j, row in enumerate(c)])]
    ctx.data["class_counts"] = counts
    for name in _cells(ctx, "federated"):
        png = ctx.trained[name].path / "partition.png"
        if png.is_file():
            blocks.append(("img", f"partition of {name}", png.relative_to(ctx.out).as_posix()))
    return blocks


def _same_silos_text(pair) -> str:
    if pair is None:
        return ""
    fed, agents = pair
    return (f" The federation (`{fed}`) and the agents of `{agents}` hold exactly the same "
            "silos (checked).")


SECTIONS = {"loss": loss, "diagnostics": diagnostics,
            "pruning_statistics": pruning_statistics, "silos": silos}


# ---------------------------------------------------------------- the report


def write_report(ctx, clock) -> tuple[Path, Path]:
    """report.md, report.html and results.json in ctx.out; returns (md, html)."""

    intro, verdict = PROSE[ctx.preset.report]
    middle: list[Block] = []
    for name in ctx.preset.sections:
        middle += SECTIONS[name](ctx)
    clock.lap("report")
    ctx.laps, ctx.total = dict(clock.laps), clock.total
    title = ctx.preset.title.format(dataset=ctx.preset.dataset)
    blocks = [("h1", title), *intro(ctx), *results(ctx), ("h2", "Verdict"),
              ("ul", verdict(ctx)), *samples(ctx), *middle, *timings(ctx), *files(ctx)]
    atomic_write_text(ctx.out / "results.json", json.dumps(json_safe({
        "preset": ctx.preset.name, "budget": ctx.preset.budget, "dataset": ctx.preset.dataset,
        "seed": ctx.preset.seed, "reference": ctx.preset.reference,
        "classifier_accuracy": ctx.classifier_accuracy, "rows": ctx.rows, **ctx.data,
        "reused": {n: t.reused for n, t in ctx.trained.items()},
        "timings_s": ctx.laps, "total_s": ctx.total,
        "resolved": ctx.preset.model_dump(mode="json")}), indent=2))
    md, page = ctx.out / "report.md", ctx.out / "report.html"
    atomic_write_text(md, to_markdown(blocks))
    atomic_write_text(page, to_html(blocks, ctx.out, title))
    return md, page
