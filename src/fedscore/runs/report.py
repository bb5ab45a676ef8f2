"""`fedscore report RUN_DIR [RUN_DIR...]`: several runs side by side in one report.md.

Everything comes from the run folders (DESIGN principle 10): config.yaml for what each run
is, metrics.jsonl for its loss curve and pruning statistics, eval.json for its scores and
samples.png for its pictures. Anything missing is reported as missing, never guessed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedscore.config import FederationConfig, RunConfig, load_config
from fedscore.errors import FedscoreError
from fedscore.io import atomic_write_text
from fedscore.plotting import pyplot
from fedscore.runs.folder import RunFolder
from fedscore.runs.plots import loss_curves

# eval.json keys shown in the table, in this order, with their labels; other numeric
# top-level keys follow under their own names. (mean, std) pairs show as "mean ± std".
METRICS: list[tuple[str, str]] = [
    ("fid", "FID (domain features) ↓"),
    ("kid_mean", "KID ↓"),
    ("is_mean", "IS ↑"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("class_accuracy", "class accuracy ↑"),
    ("unrecognisable", "unrecognisable ↓"),
    ("inception_fid", "FID (Inception) ↓"),
    ("inception_is_mean", "IS (Inception) ↑"),
    ("mmd2", "MMD² ↓"),
    ("sliced_w2", "sliced W₂ ↓"),
    ("kl", "KL estimate ↓"),
    ("component_tv", "component TV ↓"),
    ("score_error", "ε_score² ↓"),
    ("n_samples", "samples"),
]
PAIRS = {"kid_mean": "kid_std", "is_mean": "is_std", "inception_is_mean": "inception_is_std"}
SKIP = {"seed", "is_splits", "pr_real_samples", *PAIRS.values()}

# Per-round pruning records of federated runs (fedscore.federated.aggregate.round_stats).
# Lists are per worker: bytes are summed over workers, fractions averaged.
PRUNING: list[tuple[str, str, str]] = [
    # key, label, how to summarise over rounds
    ("gamma_star", "Γ* (final)", "last"),
    ("min_coverage", "min coverage (min over rounds)", "min"),
    ("uncovered", "uncovered coordinates (sum over rounds)", "sum"),
    ("w2", "w² (max over rounds)", "max"),
    ("keep_fraction", "keep fraction (mean)", "mean"),
    ("bytes_sent", "bytes up per round (mean)", "mean"),
    ("bytes_up", "bytes up per round (mean)", "mean"),
    ("bytes_received", "bytes down per worker per round (mean)", "mean"),
]
PRUNING_PLOTS = ("min_coverage", "uncovered", "w2")

# Per-round privacy records (fedscore.privacy.PrivacyPlan.record, issue 19): epsilon at the
# run's delta after each round, by Opacus' accountant.
PRIVACY: list[tuple[str, str, str]] = [
    ("epsilon", "ε (after the last round)", "last"),
    ("delta", "δ", "last"),
    ("noise_multiplier", "noise multiplier z", "last"),
    ("clip", "clip C", "last"),
    ("clipped_fraction", "clipped fraction (mean over rounds)", "mean"),
]


@dataclass
class RunInfo:
    path: Path
    label: str
    cfg: RunConfig | None
    records: list[dict[str, Any]]
    scores: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def x_key(self) -> str:
        """Loss curves run against "round" for federated runs, "step" otherwise."""
        return "round" if any("round" in r for r in self.records) else "step"


def _read_run(path: Path, label: str) -> RunInfo:
    if not path.is_dir():
        raise FedscoreError(f"run folder {str(path)!r} does not exist")
    has_cfg = (path / "config.yaml").is_file()
    if not has_cfg and not (path / "eval.json").is_file():
        raise FedscoreError(
            f"{str(path)!r} is not a run folder (no config.yaml, no eval.json); pass folders "
            "that `fedscore train` wrote"
        )
    notes = []
    cfg = load_config(path / "config.yaml") if has_cfg else None
    try:
        records = RunFolder(path).metrics()
    except ValueError as err:  # a line that is not JSON (e.g. a run killed mid-write)
        records = []
        notes.append(f"metrics.jsonl is unreadable ({err})")
    scores = None
    if (path / "eval.json").is_file():
        try:
            scores = json.loads((path / "eval.json").read_text())
        except ValueError as err:
            notes.append(f"eval.json is unreadable ({err})")
    else:
        notes.append("not evaluated (run `fedscore evaluate` on it)")
    return RunInfo(path, label, cfg, records, scores, notes)


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, made unique with their parents' names where two runs share one."""
    base = [p.name or str(p) for p in paths]
    names = [f"{p.parent.name}/{b}" if base.count(b) > 1 else b for p, b in zip(paths, base)]
    for i in range(len(names)):
        if names.count(names[i]) > 1:
            names[i] = f"{names[i]}#{i + 1}"
    return names


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _describe(run: RunInfo) -> list[str]:
    cfg = run.cfg
    if cfg is None:
        return ["–"] * 4
    fed = cfg.federation
    if isinstance(fed, FederationConfig):
        ratios = fed.keep_ratios if fed.keep_ratios is not None else f"level {fed.level}"
        training = (f"federated: {fed.workers} workers, {fed.rounds} rounds, policy "
                    f"{fed.policy}, {ratios}, partition {fed.partition.scheme}")
    else:
        training = f"centralised: {cfg.train.steps} steps"
    model = f"{cfg.model.kind} {cfg.model.size if cfg.model.kind == 'unet' else ''}".strip()
    if cfg.model.pretrained:
        model += f" from {cfg.model.pretrained}"
    if cfg.model.conditional:
        model += " (conditional)"
    last = run.records[-1] if run.records else {}
    data = cfg.data.name if cfg.data.path is None else f"{cfg.data.name} {cfg.data.path}"
    return [data, model, training,
            f"{_fmt(last.get('loss'))} / {_fmt(last.get('eq9_heldout'))}"]


def _metric_rows(runs: list[RunInfo]) -> list[list[str]]:
    known = [k for k, _ in METRICS]
    extra: list[str] = []
    for r in runs:
        for k, v in (r.scores or {}).items():
            if (k not in known and k not in SKIP and k not in extra
                    and isinstance(v, int | float) and not isinstance(v, bool)):
                extra.append(k)
    rows = []
    for key, label in [*METRICS, *((k, k) for k in extra)]:
        cells = []
        for r in runs:
            s = r.scores or {}
            v = s.get(key)
            if key in PAIRS and v is not None and s.get(PAIRS[key]) is not None:
                cells.append(f"{v:.4g} ± {s[PAIRS[key]]:.2g}")
            else:
                cells.append(_fmt(v))
        if any(c != "–" for c in cells):
            rows.append([label, *cells])
    return rows


def _summarise(values: list[Any], how: str, key: str) -> float | None:
    flat = []
    for v in values:
        if isinstance(v, list):  # per worker
            nums = [float(x) for x in v if isinstance(x, int | float)]
            if not nums:
                continue
            v = sum(nums) if key.startswith("bytes") else sum(nums) / len(nums)
        if isinstance(v, int | float) and not isinstance(v, bool):
            flat.append(float(v))
    if not flat:
        return None
    return {"last": flat[-1], "min": min(flat), "max": max(flat), "sum": sum(flat),
            "mean": sum(flat) / len(flat)}[how]


def _pruning_rows(runs: list[RunInfo]) -> list[list[str]]:
    rows = []
    for key, label, how in PRUNING:
        cells = [_summarise([rec[key] for rec in r.records if key in rec], how, key)
                 for r in runs]
        if any(c is not None for c in cells):
            rows.append([label, *(_fmt(c) for c in cells)])
    return rows


def _privacy_rows(runs: list[RunInfo]) -> list[list[str]]:
    """The privacy table: a run without `privacy` shows ε = ∞ (no guarantee)."""
    if not any("epsilon" in rec for r in runs for rec in r.records):
        return []
    rows = [["mode", *((r.cfg.privacy.mode if r.cfg and r.cfg.privacy else "none")
                       for r in runs)]]
    for key, label, how in PRIVACY:
        cells = []
        for r in runs:
            v = _summarise([rec[key] for rec in r.records if key in rec], how, key)
            private = r.cfg is not None and r.cfg.privacy is not None
            cells.append("∞" if key == "epsilon" and v is None and not private else _fmt(v))
        rows.append([label, *cells])
    return rows


def _plot_losses(runs: list[RunInfo], out: Path) -> list[tuple[str, Path]]:
    """One figure per x axis in use ("step" for centralised, "round" for federated)."""

    figures = []
    for x_key in ("step", "round"):
        curves = {}
        for r in runs:
            pts = [(rec[x_key], rec["loss"]) for rec in r.records
                   if r.x_key == x_key and x_key in rec and isinstance(rec.get("loss"),
                                                                       int | float)]
            if pts:
                curves[r.label] = ([p[0] for p in pts], [p[1] for p in pts])
        if curves:
            positive = all(y > 0 for _, ys in curves.values() for y in ys)
            path = loss_curves(curves, out / f"loss_{x_key}.png", xlabel=x_key,
                               title=f"training loss per {x_key}", logy=positive)
            figures.append((x_key, path))
    return figures


def _plot_pruning(runs: list[RunInfo], out: Path) -> Path | None:
    plt = pyplot()
    keys = [k for k in PRUNING_PLOTS if any(k in rec for r in runs for rec in r.records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in runs:
            pts = [(rec.get("round", i + 1), rec[key]) for i, rec in enumerate(r.records)
                   if isinstance(rec.get(key), int | float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r.label)
        ax.set_xlabel("round")
        ax.set_title(key)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    path = out / "pruning.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write `out/report.md` (+ PNGs in out) comparing the runs: what each run is, its
    eval.json scores side by side, loss curves on one plot, pruning statistics when the
    runs logged them, and each run's samples.png. Returns the report's path."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise FedscoreError("report needs at least one run folder")
    runs = [_read_run(p, label) for p, label in zip(paths, _labels(paths))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only once every run folder has been read
    names = [r.label for r in runs]

    lines = [f"# fedscore report: {', '.join(names)}", ""]
    lines += ["## Runs", ""]
    lines += _table(["run", "folder", "data", "model", "training", "final loss / eq. 9"],
                    [[r.label, f"`{r.path}`", *_describe(r)] for r in runs])
    notes = [f"- **{r.label}**: {n}" for r in runs for n in r.notes]
    lines += ["", *notes, ""] if notes else [""]

    lines += ["## Scores", ""]
    rows = _metric_rows(runs)
    if rows:
        lines += _table(["metric", *names], rows)
        fed = [r.label for r in runs
               if ((r.scores or {}).get("real_statistics") or {}).get("merged")]
        if fed:
            lines += ["", f"Federated evaluation for {', '.join(fed)}: FID's real statistics "
                      "were computed per silo and merged by addition (eval.json, "
                      "`real_statistics`)."]
    else:
        lines += ["No run has an eval.json yet: run `fedscore evaluate RUN_DIR`."]
    lines.append("")

    lines += ["## Training loss", ""]
    figures = _plot_losses(runs, out)
    lines += [f"![training loss per {x}]({p.name})" for x, p in figures] or [
        "No loss records in metrics.jsonl."]
    lines.append("")

    prune = _pruning_rows(runs)
    if prune:
        lines += ["## Pruning statistics", ""]
        lines += _table(["statistic", *names], prune)
        plot = _plot_pruning(runs, out)
        if plot is not None:
            lines += ["", f"![pruning statistics per round]({plot.name})"]
        lines.append("")

    private = _privacy_rows(runs)
    if private:
        lines += ["## Differential privacy", ""]
        lines += _table(["", *names], private)
        lines += ["", "ε at δ by Opacus' accountant (privacy.accountant), counted after every "
                  "round (metrics.jsonl); docs/privacy.md says what it protects."]
        lines.append("")

    lines += ["## Samples", ""]
    for r in runs:
        src = r.path / "samples.png"
        lines.append(f"### {r.label}")
        lines.append("")
        if src.is_file():
            dest = out / f"samples-{_slug(r.label)}.png"
            if src.resolve() != dest.resolve():
                shutil.copyfile(src, dest)
            lines.append(f"![samples of {r.label}]({dest.name})")
        else:
            lines.append("No samples.png (run `fedscore sample` on it).")
        lines.append("")

    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
