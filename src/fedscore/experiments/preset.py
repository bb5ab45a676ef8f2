"""An experiment is a preset: YAML data listing cells, validated at the edge (DESIGN 8).

A preset (presets/<name>.yaml, shipped inside the package so an installed fedscore finds
them) holds:

- `config`: the RunConfig fields every cell shares (fedscore.config);
- `cells`: name -> one cell, trained, sampled and evaluated by the one runner:
  `federated` (a federated run, eqs. 7-8), `central` (one model trained on the pooled
  training split: the baseline federation and federated inference are measured against),
  `agents` (FI agents of one regime, each sample set one aggregator) or `real` (real images
  of a split: the floor the metrics reach at the samples' size); a cell's own `config` is
  merged over the shared one;
- `sampling`: how every sample set is drawn (sampler, grid, steps, samples per label, the
  seed offset of the shared initial noise, whether the denoised estimate is clipped);
- `reference`: the split FID is measured against ("train" or "test"), named in every table;
- `budgets`: name -> overrides deep-merged over the preset (e.g. `quick`, `cpu`): budgets
  are data, not classes. `default_budget` is the one used when none is named.

`load_preset(name_or_path, budget=, dataset=, seed=, overrides=)` returns the resolved,
validated `Preset`; a bad key is one FedscoreError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedscore import data as datasets
from fedscore.config import RunConfig, describe, merge, read_yaml
from fedscore.errors import FedscoreError, unknown
from fedscore.experiments.agents import AGGREGATOR_NAMES
from fedscore.inference.agents import REGIMES

PRESETS = Path(__file__).with_name("presets")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(Strict):
    """How every sample set of the experiment is drawn (all from the same initial noise)."""

    method: Literal["exp-integrator", "euler-maruyama", "ancestral"]
    """An SDE sampler: the mixture aggregator tracks densities with the sampler's noise."""
    grid: Literal["uniform", "exponential"] = "exponential"
    steps: int = Field(ge=1)
    per_label: int = Field(ge=1)
    """Samples per class label in every sample set."""
    clip: bool = False
    """Clip the denoised estimate to [-1, 1] at every step (diffusion.clip_denoised)."""
    seed_offset: int = 1000
    """The initial noise's generator seed is the experiment's seed plus this."""


class Cell(Strict):
    kind: Literal["federated", "central", "agents", "real"]
    label: str
    """The row's name in tables; `{aggregator}` is replaced for agents cells."""
    config: dict[str, Any] = Field(default_factory=dict)
    """RunConfig fields of this cell, merged over the preset's shared `config`."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Copied into every row of the cell (e.g. policy and level, or the FI regime)."""
    panel: str | None = None
    """Training-loss panel of a federated or central cell (cells sharing a panel share an axis)."""
    regime: str | None = None
    """agents: the FI paper's regime (control, homogeneous, heterogeneous)."""
    n_agents: int = Field(10, ge=1)
    aggregators: list[str] = Field(default_factory=lambda: ["mean"])
    split: Literal["train", "test"] = "train"
    """real: which split the real images come from."""

    @model_validator(mode="after")
    def _kind_fields(self) -> Cell:
        if self.kind == "agents":
            if self.regime not in REGIMES:
                raise ValueError(f"agents cells need regime: one of {', '.join(REGIMES)}")
            bad = [a for a in self.aggregators if a not in AGGREGATOR_NAMES]
            if bad or not self.aggregators:
                raise ValueError(f"aggregators must be some of {', '.join(AGGREGATOR_NAMES)}, "
                                 f"got {self.aggregators}")
        return self


class Preset(Strict):
    name: str
    title: str
    """The report's first heading; `{dataset}` is replaced."""
    dataset: str
    downsample: int = Field(1, ge=1)
    """Read the dataset at 1/downsample of its resolution ("mnist5k" -> "mnist5k:14x14" for
    2): a CPU budget's lever, 3-4x fewer pixels to train on. A dataset named with its own
    resolution ("mnist5k:14x14"), and images under 16x16 (the 8x8 `digits`), are kept as
    they are."""
    seed: int = 0
    reference: Literal["train", "test"]
    """FID's reference split, named in every table."""
    report: Literal["pruning", "federated-inference", "demo"]
    """The experiment-specific prose (fedscore.experiments.prose)."""
    sections: list[Literal["loss", "diagnostics", "pruning_statistics", "silos"]] = Field(
        default_factory=list)
    """Optional report sections (fedscore.experiments.sections), in report order."""
    columns: list[Literal["final_loss", "eq9", "fid", "is", "class_accuracy", "unrecognisable",
                          "recognisable", "gamma_star", "bytes_sent",
                          "evals_per_step"]] = Field(
        default_factory=lambda: ["fid", "is", "class_accuracy", "unrecognisable"])
    """The results table's columns (fedscore.experiments.report.COLUMNS)."""
    diagnostic_inputs: int = Field(10, ge=1)
    """diagnostics: noise and real test inputs per label (the FI paper: 10 of each)."""
    same_silos: tuple[str, str] | None = None
    """(federated cell, agents cell) that must hold the same silos; checked after training."""
    config: dict[str, Any] = Field(default_factory=dict)
    sampling: Sampling
    cells: dict[str, Cell]
    budget: str = ""
    """The budget this preset was resolved with (set by load_preset)."""
    device_budgets: dict[str, str] = Field(default_factory=dict)
    """The default budget on a device type ({cuda: gpu}: the demo trains longer on a GPU);
    a budget named on the command line wins."""

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        if not self.cells:
            raise ValueError("a preset needs at least one cell")
        if self.same_silos is not None:
            fed, agents = self.same_silos
            kinds = {k: c.kind for k, c in self.cells.items()}
            if kinds.get(fed) != "federated" or kinds.get(agents) != "agents":
                raise ValueError(f"same_silos must name a federated and an agents cell, got "
                                 f"{list(self.same_silos)}")
        return self

    def cell_config(self, name: str, out: str | Path) -> RunConfig:
        """The RunConfig of a federated, central or agents cell: shared config, then the
        cell's, with the preset's dataset and seed; out_dir `out`, name the cell's. A
        federated or central cell samples with the preset's `sampling` (so `fedscore sample`
        on its folder draws as the experiment did)."""
        cell = self.cells[name]
        fields = merge(self.config, cell.config)
        fields = merge(fields, {"data": {"name": self.dataset}})
        if cell.kind in ("federated", "central"):
            s = self.sampling
            fields = merge(fields, {"sample": {
                "method": s.method, "grid": s.grid, "steps": s.steps,
                "n": 10 * s.per_label, "clip_denoised": s.clip}})
        fields = merge(fields, {"name": name, "out_dir": str(out), "seed": self.seed})
        try:
            cfg = RunConfig.model_validate(fields)
        except ValidationError as err:
            raise FedscoreError(describe(
                err, f"cell {name!r} of experiment preset {self.name!r}")) from None
        if cell.kind == "central" and cfg.federation != "none":
            raise FedscoreError(
                f"cell {name!r} of experiment preset {self.name!r} is central (one model on "
                "the pooled training data): remove its federation settings")
        return cfg


def preset_names() -> list[str]:
    """The presets shipped with fedscore."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def _read(name_or_path: str | Path) -> tuple[dict, str]:
    path = Path(name_or_path)
    if not path.suffix:
        if str(name_or_path) not in preset_names():
            raise unknown("experiment preset", name_or_path, preset_names())
        path = PRESETS / f"{name_or_path}.yaml"
    raw = read_yaml(path, "experiment preset")
    return raw, str(path)


def load_preset(name_or_path: str | Path, *, budget: str | None = None,
                dataset: str | None = None, seed: int | None = None,
                overrides: dict[str, Any] | None = None) -> Preset:
    """A shipped preset by name (`pruning`, `federated-inference`, `demo`) or a YAML path,
    with budget `budget` (default: its `default_budget`) and then `overrides` deep-merged
    over it; `dataset` and `seed` replace the preset's. Every cell's RunConfig is built once
    here, so a bad config key fails before any training."""
    raw, source = _read(name_or_path)
    budgets = raw.pop("budgets", {}) or {}
    default = raw.pop("default_budget", None)
    budget = budget or default
    if budget is None or budget not in budgets:
        raise FedscoreError(
            f"unknown budget {budget!r} of experiment {raw.get('name', source)!r}; choose one "
            f"of: {', '.join(budgets) or '(none defined: add a budgets: section)'}")
    raw = merge(raw, budgets[budget] or {})
    raw = merge(raw, overrides or {})
    raw["budget"] = budget
    if dataset is not None:
        raw["dataset"] = dataset
    if seed is not None:
        raw["seed"] = seed
    try:
        preset = Preset.model_validate(raw)
    except ValidationError as err:
        raise FedscoreError(describe(err, f"experiment preset {source}")) from None
    if preset.downsample > 1:
        shape = datasets.info(preset.dataset).shape
        if len(shape) != 3:
            raise FedscoreError(f"downsample: {preset.downsample} is for image datasets, not "
                                f"{preset.dataset!r}; remove it or set it to 1")
        h, w = shape[-2:]
        if min(h, w) >= 16 and ":" not in preset.dataset:
            preset.dataset = f"{preset.dataset}:{h // preset.downsample}x{w // preset.downsample}"
    for name, cell in preset.cells.items():
        if cell.kind != "real":
            preset.cell_config(name, "runs")
    return preset
