"""The demo's report: one list of blocks rendered twice, as report.md and as a
self-contained report.html (images embedded), so the two never say different things.

A block is a tuple: ("h1" | "h2" | "h3" | "p", text), ("ul", [items]),
("table", header, rows), ("img", alt, path relative to the report). Inline text may use
`code` and **bold**, which both renderers understand.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

from fedscore.io import atomic_write_text
from fedscore.runs.evaluate import json_safe

Block = tuple


# ---------------------------------------------------------------- renderers (pure)


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, rows = rest
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{rest[0]}]({rest[1]})", ""]
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f3f3f3}
img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"""


def to_html(blocks: list[Block], base: Path, title: str) -> str:
    """One HTML page; images are read from `base` / their relative path and embedded, so
    the file opens anywhere (a missing image keeps its relative link)."""
    body: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r)
                            + "</tr>" for r in rows)
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
        elif kind == "img":
            alt, rel = rest
            path = Path(base) / rel
            src = _data_uri(path) if path.is_file() else html.escape(str(rel))
            body.append(f'<p><img alt="{html.escape(alt)}" src="{src}"></p>')
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


# ---------------------------------------------------------------- numbers (pure)


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


def fmt(v, spec: str = ".3f") -> str:
    """A number for a table; NaN and infinities show as such, never crash the report."""
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, spec)


def metric_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["samples", "FID vs held-out ↓", "IS ± std ↑", "class accuracy ↑",
              "recognisable ↑"]
    body = [[r["samples"], fmt(r["fid"], ".1f"),
             f"{fmt(r['is_mean'], '.2f')} ± {fmt(r['is_std'], '.2f')}",
             fmt(r["class_accuracy"]), fmt(r["recognisable"])] for r in rows]
    return header, body


def verdicts(rows: list[dict], floor: float) -> list[str]:
    """Plain sentences: recognisable digits from the federated model? mixture vs mean?"""
    by = {r["samples"]: r for r in rows}
    fed = by["federated model"]
    mean, mix = by["federated inference, mean"], by["federated inference, mixture"]
    met = fed["class_accuracy"] >= floor
    lines = [
        f"The federated global model's samples are read as the requested digit "
        f"{fed['class_accuracy']:.0%} of the time (chance 10%; the stated floor is "
        f"{floor:.0%}): **{'recognisable digits' if met else 'below the floor'}**.",
        f"Federated inference, heterogeneous agents: `mixture` "
        f"{'beats' if mix['fid'] < mean['fid'] else 'does not beat'} `mean` on FID "
        f"({mix['fid']:.1f} vs {mean['fid']:.1f}), and on class accuracy it scores "
        f"{mix['class_accuracy']:.2f} vs {mean['class_accuracy']:.2f}.",
    ]
    if max(mean["class_accuracy"], mix["class_accuracy"]) < floor:
        lines.append(
            "Neither aggregator's samples reach the floor: each agent trained alone on its "
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


def seconds_text(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s" if s >= 60 else f"{s:.1f} s"


# ---------------------------------------------------------------- the report


def _records(path: Path) -> list[dict]:
    from fedscore.runs.folder import RunFolder

    return RunFolder(path).metrics()


def build_blocks(out: Path, rows, grids, facts, timings: dict[str, float], total: float,
                 fed_records, figures) -> list[Block]:
    b = facts["budget"]
    s = pruning_summary(fed_records)
    n = len(s["keep_fraction"])
    ratios = facts["keep_ratios"]
    blocks: list[Block] = [
        ("h1", "fedscore demo: ten silos, one generative model, two ways"),
        ("p", f"Ten silos hold the FI paper's heterogeneous split of the 4,000 bundled "
              f"mnist5k training digits (silo j: half digit j, half the other nine). They "
              f"collaborate (1) by **federated training with pruning** (eqs. 7-8, top-k "
              f"masks at level {facts['level']}) into one class-conditional tiny U-Net "
              f"({facts['n_params']:,} parameters), and (2) by **federated inference**: "
              f"ten agents trained alone on the same silos, combined at every reverse step "
              f"by `mean` (the FI paper) and `mixture` (the agents' true mixture). "
              f"Total wall time **{seconds_text(total)}** ({facts['threads']} torch "
              f"thread(s), budget `{facts['budget_name']}`)."),
        ("h2", "Results"),
    ]
    header, body = metric_table(rows)
    blocks += [
        ("table", header, body),
        ("p", f"{b['n_per_label']} class-conditional samples per digit per row, all three "
              f"generated sets from the same initial noise (DDPM's ancestral sampler, "
              f"{b['sample_steps']} steps, denoised estimate clipped to the pixel range). "
              f"Scored by the project's mnist5k classifier "
              f"(held-out accuracy {facts['classifier_accuracy']:.3f}): FID of its features "
              f"against the {facts['test_size']:,} held-out test digits, IS ± std over "
              f"splits, class accuracy = fraction read as the requested digit, recognisable "
              f"= max class probability ≥ 0.5. The real-digits row is the floor at this "
              f"sample size: FID is biased upward at {10 * b['n_per_label']} samples, so "
              f"compare rows, not papers."),
        ("ul", verdicts(rows, facts["floor"])),
        ("h2", "Samples"),
    ]
    for what, path in grids.items():
        blocks += [("h3", what), ("img", f"samples: {what}", path.relative_to(out).as_posix())]
    blocks += [
        ("h2", "Training loss"),
        ("p", f"Federation: {n} workers, {b['rounds']} rounds x {b['local_steps']} local Adam "
              f"steps (batch {b['batch_size']}, lr {b['lr']}, moments "
              f"{'kept per worker across rounds' if b['adam_state'] == 'keep' else 'reset every round'}). "  # noqa: E501
              f"Agents: {b['agent_steps']} Adam steps each (batch {b['agent_batch']}, lr "
              f"{b['agent_lr']}) on their own silo only. Held-out eq. 9 is evaluated every "
              f"{b['eval_every']} round(s) on {b['eval_batch']} test digits over the "
              f"{b['grid_steps']}-point training grid."),
        ("img", "training loss", figures["loss"].name),
        ("h2", "Pruning statistics"),
        ("table", ["statistic", "value"], [
            ["keep ratio per worker (level M)", ", ".join(f"{r:g}" for r in ratios)],
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
        ]),
        ("img", "pruning statistics", figures["pruning"].name),
        ("h2", "The silos"),
        ("p", "Class counts per silo (rows: silo 0-9; columns: digit 0-9). The federation and "
              "the agents hold exactly these silos (checked); a silo's counts are all the "
              "server learns of its data."),
        ("table", ["silo", *map(str, range(len(facts["agent_counts"][0])))],
         [[str(j), *map(str, c)] for j, c in enumerate(facts["agent_counts"])]),
    ]
    if figures.get("partition") is not None:
        blocks.append(("img", "partition", figures["partition"]))
    reused = [k for k, v in facts["reused"].items() if v]
    blocks += [
        ("h2", "Timings"),
        ("table", ["stage", "wall time"],
         [[k + (" (reused from an earlier run)" if k in reused else ""), seconds_text(v)]
          for k, v in timings.items()] + [["**total**", f"**{seconds_text(total)}**"]]),
        ("h2", "Files"),
        ("ul", ["`federated/`: the federated run folder (config.yaml, metrics.jsonl with one "
                "record per round, model.safetensors, partition.png)",
                "`agents/agent-00` .. `agent-09`: one run folder per FI agent "
                "(class_counts.json, metrics.jsonl, model.safetensors, samples.png)",
                "`grids/`: the sample grids; `results.json`: every number above"]),
    ]
    return blocks


def write_report(out: Path, *, rows, grids, facts, clock) -> tuple[Path, Path]:
    """Figures, results.json, report.md and report.html in `out`; returns (md, html)."""
    from fedscore.demo.figures import loss_figure, pruning_figure

    out = Path(out)
    fed_records = _records(out / "federated")
    agent_records = {p.name: _records(p) for p in sorted((out / "agents").glob("agent-*"))}
    partition = out / "federated" / "partition.png"
    figures = {"loss": loss_figure(fed_records, agent_records, out / "loss.png"),
               "pruning": pruning_figure(fed_records, out / "pruning.png"),
               "partition": "federated/partition.png" if partition.is_file() else None}
    clock.lap("report")
    total = clock.total
    timings = dict(clock.laps)
    blocks = build_blocks(out, rows, grids, facts, timings, total, fed_records, figures)
    atomic_write_text(out / "results.json", json.dumps(json_safe(
        {"rows": rows, "facts": facts, "pruning": pruning_summary(fed_records),
         "timings_s": timings, "total_s": total}), indent=2, default=str))
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, to_markdown(blocks))
    atomic_write_text(page, to_html(blocks, out, "fedscore demo"))
    return md, page
