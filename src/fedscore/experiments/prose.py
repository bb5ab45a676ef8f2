"""What each experiment says in words, selected by its preset's `report`: an introduction
(the setting) and the verdict sentences read off the rows. Tables, grids, figures and
timings are not here: every experiment renders those through the one path in
fedscore.experiments.sections."""

from __future__ import annotations

import torch

from fedscore.experiments.report import Block, fmt, seconds_text

RECOGNISABLE_FLOOR = 0.35
"""Class accuracy the demo's federated model must reach to count as drawing recognisable
digits (chance is 0.1; the full budget measured 0.49, demo.yaml says how); the report
says whether the run met it."""


AGGREGATOR_GLOSS = {"mean": " (the FI paper)", "weighted": " (by each agent's count of the label)",
                    "mixture": " (the agents' true mixture)",
                    "route": " (the same mixture, each sample drawn by one agent)"}


def _find(rows: list[dict], **tags) -> dict:
    return next(r for r in rows if all(r.get(k) == v for k, v in tags.items()))


def _maybe(rows: list[dict], **tags) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in tags.items())), None)


def _scores(r: dict) -> str:
    return f"class accuracy {r['class_accuracy']:.2f}, FID {fmt(r['fid'], '.1f')}"


def baselines_sentence(central: dict, federated: dict | None, fi: list[dict]) -> str:
    """The reviewer's comparison in one sentence: the centralised model on the pooled data
    beside the federated model and the best federated-inference row of the same silos (by
    class accuracy; same sampler, noise and evaluation, every row in the table), and which
    of them comes closest to the centralised model."""
    parts = [f"the federated model {_scores(federated)}"] if federated else []
    if fi:
        best = max(fi, key=lambda r: r["class_accuracy"])
        parts.append(f"the best federated-inference row, {best['samples']}, {_scores(best)}")
    text = f"Against the centralised model on the pooled data ({_scores(central)})"
    if not parts:
        return text + ": no other row to compare."
    closest = max(([federated] if federated else []) + fi, key=lambda r: r["class_accuracy"])
    gap = round(central["class_accuracy"] - closest["class_accuracy"], 2)
    where = (f"{gap:.2f} below it" if gap > 0 else f"{-gap:.2f} above it" if gap < 0
             else "level with it")
    return f"{text}: {'; '.join(parts)}. Closest by class accuracy: {closest['samples']} ({where})."


def route_sentence(rows: list[dict]) -> str | None:
    """route against mixture: the same target distribution, one network evaluation per
    sample per step instead of K."""
    route, mix = _maybe(rows, aggregator="route"), _maybe(rows, aggregator="mixture")
    if route is None or mix is None:
        return None
    return (f"`route` samples the agents' mixture at {fmt(route.get('evals_per_step'), 'g')} "
            f"network evaluation(s) per sample per step against `mixture`'s "
            f"{fmt(mix.get('evals_per_step'), 'g')}: {_scores(route)} vs {_scores(mix)}.")


# ---------------------------------------------------------------- pruning paper


def pruning_intro(ctx) -> list[Block]:
    p = ctx.preset
    fed = p.cell_config(next(iter(p.cells)), ctx.out).federation
    s = p.sampling
    return [("p", (
        f"{fed.workers} workers ({fed.partition.scheme}), tiny U-Net, Adam lr {fed.lr:g}, "
        f"{fed.rounds} rounds x {fed.local_steps} local steps of batch {fed.batch_size} (the "
        "paper: Q = 300 rounds on a GPU; this budget is what fits a 2-core CPU, so absolute "
        "quality is low and the comparison is between levels at equal budget). "
        f"{s.per_label * 10} samples per run ({s.steps} {s.method} steps)."))]


def pruning_verdict(rows: list[dict]) -> list[str]:
    """Does the final training loss order the levels as the paper's F < L < M < S?"""
    lines = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        losses = {r["level"]: r["final_loss"] for r in rows if r["policy"] == policy}
        paper = [lv for lv in "FLMS" if lv in losses]
        order = sorted(paper, key=lambda lv: losses[lv])
        holds = order == paper
        lines.append(f"{policy}: measured order {' < '.join(order)} at the last round — the "
                     f"paper's {' < '.join(paper)} {'holds' if holds else 'does not hold'} "
                     "here")
    return lines


# ---------------------------------------------------------------- FI paper


def fi_intro(ctx) -> list[Block]:
    p = ctx.preset
    cfg = ctx.trained[next(iter(p.cells))].cfg
    t = cfg.train
    n_agents = max(c.n_agents for c in p.cells.values())
    # each agents cell's own steps: a budget may train the control agent longer (equal
    # epochs: ten times the data, ten times the steps)
    steps = {n: ctx.trained[n].cfg.train.steps for n, c in p.cells.items()
             if c.kind == "agents"}
    per_cell = (f"{t.steps} optimiser steps per agent" if len(set(steps.values())) == 1
                else "optimiser steps per agent: " + ", ".join(
                    f"{n} {s}" for n, s in steps.items()))
    return [("ul", [
        f"Budget `{p.budget}`: {per_cell} (batch {t.batch_size}, "
        f"Adam lr {t.lr:g}), tiny class-conditional U-Net {cfg.model.options or ''}, "
        f"{n_agents} agents per federated regime; the paper trained to convergence on a "
        "GPU, so absolute numbers here are those of briefly trained agents.",
        *_fi_baselines(ctx),
        f"Wall time: {ctx.total:.0f} s with {torch.get_num_threads()} torch thread(s).",
    ])]


def _fi_baselines(ctx) -> list[str]:
    """What the baseline rows are: the control agent doubles as the centralised model, and
    a federated cell (eqs. 7-8) trains on the silos of the agents it is paired with."""
    lines = [f"The `{n}` row is the centralised baseline: one model trained alone on the "
             "pooled training split (the FI paper's control)."
             for n, c in ctx.preset.cells.items() if c.kind == "agents" and c.regime == "control"]
    for name, cell in ctx.preset.cells.items():
        if cell.kind != "federated":
            continue
        f = ctx.trained[name].cfg.federation
        silos = (f"the silos of `{ctx.preset.same_silos[1]}`"
                 if ctx.preset.same_silos and ctx.preset.same_silos[0] == name
                 else f"a {f.partition.scheme} partition")
        lines.append(
            f"The `{name}` row is one model trained by federated learning with pruning "
            f"(eqs. 7-8, {f.policy} masks at level {f.level}) on {silos}: {f.workers} workers "
            f"x {f.rounds} rounds x {f.local_steps} local steps of batch {f.batch_size}.")
    return lines


def fi_verdict(rows: list[dict]) -> list[str]:
    """Plain sentences: does `mixture` beat `mean` in the heterogeneous regime? How do the
    heterogeneous rows and the federated model compare with the centralised (control)
    agent, and `route` with `mixture`?"""
    mean = _find(rows, regime="heterogeneous", aggregator="mean")
    mix = _find(rows, regime="heterogeneous", aggregator="mixture")
    fid = mix["fid"] < mean["fid"]
    unr = mix["unrecognisable"] < mean["unrecognisable"]
    lines = [
        f"FID (lower is better): `mixture` **{'beats' if fid else 'does not beat'}** "
        f"`mean` ({mix['fid']:.2f} vs {mean['fid']:.2f}).",
        f"Unrecognisable fraction (lower is better): `mixture` "
        f"**{'beats' if unr else 'does not beat'}** `mean` "
        f"({mix['unrecognisable']:.3f} vs {mean['unrecognisable']:.3f}).",
    ]
    het = [r for r in rows if r.get("regime") == "heterogeneous" and r.get("aggregator")]
    lines.append(baselines_sentence(_find(rows, regime="control"),
                                    _maybe(rows, regime="heterogeneous", training="federated"),
                                    het))
    route = route_sentence(het)
    if route:
        lines.append(route)
    control = _find(rows, regime="control")["class_accuracy"]
    if control < 0.5:
        lines.append(
            f"Caution: the control agent's own samples are read as the requested digit only "
            f"{control:.0%} of the time, so these agents are too briefly trained for the "
            "numbers above to rank the aggregators; rerun with a larger budget.")
    if "mixture_max_weight" in mix:
        lines.append(
            f"The mixture's final weights put on average {mix['mixture_max_weight']:.2f} on "
            "each trajectory's heaviest agent (1 = settled on one agent, 1/K = undecided).")
    return lines


# ---------------------------------------------------------------- the demo


def demo_intro(ctx) -> list[Block]:
    fed = ctx.trained["federated"]
    n_params = sum(p.numel() for p in fed.model.parameters())
    level = fed.cfg.federation.level
    return [("p", (
        "Ten silos hold the FI paper's heterogeneous split of the bundled "
        f"{ctx.preset.dataset} training digits (silo j: half digit j, half the other nine). "
        "They collaborate (1) by **federated training with pruning** (eqs. 7-8, top-k masks "
        f"at level {level}) into one class-conditional tiny U-Net ({n_params:,} parameters), "
        "and (2) by **federated inference**: ten agents trained alone on the same silos, "
        "combined at every reverse step by "
        + ", ".join(f"`{a}`" + AGGREGATOR_GLOSS.get(a, "")
                    for a in ctx.preset.cells["agents"].aggregators)
        + "; beside them " + _central_text(ctx)
        + f". Total wall time **{seconds_text(ctx.total)}** "
        f"({torch.get_num_threads()} torch thread(s), budget `{ctx.preset.budget}`)."))]


def _central_text(ctx) -> str:
    """The demo's centralised baseline and its budget beside the federation's (optimiser
    steps x batch), so a reader sees what each was given."""
    central = [n for n, c in ctx.preset.cells.items() if c.kind == "central"]
    if not central:
        return "no centralised baseline (the preset has no central cell)"
    t = ctx.trained[central[0]].cfg.train
    f = ctx.trained["federated"].cfg.federation
    return (f"a **centralised model on the pooled data**, the baseline no silo could train "
            f"without sharing its digits ({t.steps:,} steps of batch {t.batch_size}; the "
            f"federation's workers took {f.workers * f.rounds * f.local_steps:,} of batch "
            f"{f.batch_size})")


def demo_verdict(rows: list[dict], floor: float = RECOGNISABLE_FLOOR) -> list[str]:
    """Plain sentences: recognisable digits from the federated model? Which aggregator draws
    them best, beside the FI paper's `mean`? mixture vs mean? Every row against the
    centralised model (when the preset has a central cell); route vs mixture."""
    fed = _find(rows, samples="federated model")
    mean = _find(rows, cell="agents", aggregator="mean")
    mix = _find(rows, cell="agents", aggregator="mixture")
    best = max((r for r in rows if r.get("cell") == "agents"),
               key=lambda r: r["class_accuracy"])
    met = fed["class_accuracy"] >= floor
    lines = [
        f"The federated global model's samples are read as the requested digit "
        f"{fed['class_accuracy']:.0%} of the time (chance 10%; the stated floor is "
        f"{floor:.0%}): **{'recognisable digits' if met else 'below the floor'}**.",
        f"Federated inference, heterogeneous agents: the best aggregator by class accuracy "
        f"is `{best['aggregator']}` ({best['class_accuracy']:.2f}; the FI paper's `mean` "
        f"{mean['class_accuracy']:.2f}). `mixture` "
        f"{'beats' if mix['fid'] < mean['fid'] else 'does not beat'} `mean` on FID "
        f"({fmt(mix['fid'], '.1f')} vs {fmt(mean['fid'], '.1f')}).",
    ]
    central = _maybe(rows, cell="central")
    if central is not None:
        lines.append(baselines_sentence(central, fed, [r for r in rows
                                                       if r.get("cell") == "agents"]))
    route = route_sentence(rows)
    if route:
        lines.append(route)
    if best["class_accuracy"] < floor:
        lines.append(
            "No aggregator's samples reach the floor: each agent trained alone on its "
            "silo for a small share of the budget, too briefly to draw digits, so this "
            "compares two ways of combining undertrained models. Where the agents' scores "
            "are exact (Gaussian mixtures), the tests show `mixture` sampling the pooled "
            "data and `mean` not (tests/inference/test_aggregators.py).")
    if "mixture_max_weight" in mix:
        lines.append(
            f"The mixture's final weights put on average {mix['mixture_max_weight']:.2f} on "
            "one agent per sample: each trajectory settled on the agents whose data explain "
            "it (the mean aggregator averages all ten agents' scores throughout).")
    return lines


PROSE = {
    "pruning": (pruning_intro, lambda ctx: pruning_verdict(ctx.rows)),
    "federated-inference": (fi_intro, lambda ctx: fi_verdict(ctx.rows)),
    "demo": (demo_intro, lambda ctx: demo_verdict(ctx.rows)),
}
"""preset.report -> (introduction blocks, verdict sentences), each a function of the
report's Context."""
