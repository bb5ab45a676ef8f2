"""The one report renderer of every experiment: a list of blocks rendered twice, as
report.md and as a self-contained report.html (images embedded), so the two never say
different things; the results table of every experiment is `metric_table`.

A block is a tuple: ("h1" | "h2" | "h3" | "p", text), ("ul", [items]),
("table", header, rows), ("img", alt, path relative to the report). Inline text may use
`code` and **bold**, which both renderers understand.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

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


def fmt(v, spec: str = ".3f") -> str:
    """A number for a table; NaN and infinities show as such, never crash the report."""
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, spec)


def seconds_text(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s" if s >= 60 else f"{s:.1f} s"


def _is_cell(r: dict) -> str:
    return f"{fmt(r['is_mean'], '.2f')} ± {fmt(r['is_std'], '.2f')}"


def _splits(rows: list[dict]) -> str:
    splits = sorted({r["is_splits"] for r in rows})
    return " or ".join(map(str, splits)) + (" split" if splits == [1] else " splits")


# column -> (header given the rows, cell given a row); "fid" and "is" name the reference
# split and the number of IS splits in their header, so no table can hide them
COLUMNS = {
    "final_loss": (lambda rows: "final loss", lambda r: fmt(r.get("final_loss"), ".4f")),
    "eq9": (lambda rows: "held-out eq. 9", lambda r: fmt(r.get("eq9"), ".1f")),
    "fid": (lambda rows: f"FID vs {rows[0]['reference']} split ↓",
            lambda r: fmt(r["fid"], ".2f")),
    "is": (lambda rows: f"IS ± std ({_splits(rows)}) ↑", _is_cell),
    "class_accuracy": (lambda rows: "class accuracy ↑", lambda r: fmt(r["class_accuracy"])),
    "unrecognisable": (lambda rows: "unrecognisable ↓", lambda r: fmt(r["unrecognisable"])),
    "recognisable": (lambda rows: "recognisable ↑", lambda r: fmt(1.0 - r["unrecognisable"])),
    "gamma_star": (lambda rows: "Γ*", lambda r: str(r.get("gamma_star", "–"))),
    "bytes_sent": (lambda rows: "bytes sent / round",
                   lambda r: f"{r['bytes_sent']:,}" if "bytes_sent" in r else "–"),
    # a sample set's sampling cost: 1 for one model and for route, K for mean, weighted,
    # hybrid and mixture (runner.sample_sets)
    "evals_per_step": (lambda rows: "network evaluations / sample / step",
                       lambda r: fmt(r.get("evals_per_step"), "g")),
}


def metric_table(rows: list[dict], columns: list[str]) -> Block:
    """The results table: one row per sample set (`samples`), the given COLUMNS."""
    header = ["samples", *(COLUMNS[c][0](rows) for c in columns)]
    body = [[r["samples"], *(COLUMNS[c][1](r) for c in columns)] for r in rows]
    return ("table", header, body)
