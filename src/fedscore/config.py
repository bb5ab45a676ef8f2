"""Run configuration: YAML -> pydantic, validated at the edge (DESIGN principle 8).

Every key is checked: a typo, a wrong type or an unknown name becomes one FedscoreError that
names the field and the allowed values. The resolved config is written into every run
folder, so a run can be repeated from its folder alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from fedscore.errors import FedscoreError


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads `true` as 1 for a number: `train.steps=true` would run one
    # step; a boolean where a number belongs is a mistake, say so
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Run names: one folder name under `out_dir` (letters, digits, '.', '_', '-'; no path
separators, not '.' or '..'), so a name never writes outside its output folder."""


MAX_SEED = 2**62 - 1
"""The largest run seed: the streams derived from it (the data split's SPLIT_SEED + 2 seed + 1,
held-out seeds + 20000) still fit the 64 bits a torch.Generator takes."""


class Strict(BaseModel):
    # allow_inf_nan=False: `train.lr=.inf` or `diffusion.T=.nan` is refused at the edge
    # instead of training a model of NaNs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


OWN_DATA = ("folder", "arrays")
"""`data.name` of the user's own images: an image folder or an .npz file at `data.path`."""

_OWN_OPTIONS = {"image_size": None, "channels": None, "hflip": False, "classes": None,
                "test_fraction": 0.2, "split_seed": 12345}
"""The DataConfig options that only own data read, with their defaults."""


def data_problem(d) -> str | None:
    """What is wrong with a data config's combination of fields (None: nothing): `path` or
    own-data options with a built-in dataset, a variant on own data. Duck-typed (anything
    with DataConfig's fields), so `fedscore.data` checks the same rule on what it is given.
    Own data without `path` are allowed here: a Flower server's config names own data that
    only the SuperNodes hold (`data-path` in their node config)."""
    name = d.name
    family, _, variant = name.partition(":")
    if family in OWN_DATA:
        if variant:
            return (f"data.name {name!r}: own data take no variant; choose their resolution "
                    f"with data.image_size (e.g. data.image_size: 32)")
        return None
    for key in ("path", "test_path"):
        if getattr(d, key, None) is not None:
            return (f"data.{key} is for your own data (data.name: folder or arrays); "
                    f"{name!r} is a built-in dataset: drop data.{key}, or set data.name to "
                    f"'folder' (an image folder) or 'arrays' (an .npz file)")
    for key, default in _OWN_OPTIONS.items():
        if getattr(d, key, default) != default:
            return (f"data.{key} applies to your own data (data.name: folder or arrays) only; "
                    f"{name!r} is a built-in dataset with a fixed split and size: drop "
                    f"data.{key} (a built-in image dataset's resolution is chosen by its name, "
                    f"e.g. 'mnist5k:14x14')")
    return None


class DataConfig(Strict):
    name: str = "gmm:ring8"
    """A dataset of `fedscore.data` ("mnist5k", "digits", "mnist", ..., "gmm:<preset>"), or
    the user's own images: "folder" (an image folder at `path`) or "arrays" (an .npz file at
    `path`)."""
    data_root: str | None = None
    """Where a torchvision dataset (mnist, fashion-mnist, cifar10, svhn) lies."""
    download: bool = False
    path: str | None = None
    """The image folder or .npz file of `name: folder | arrays`."""
    test_path: str | None = None
    """A separate held-out folder / .npz (same format); else `test_fraction` of `path`."""
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    """Own data without `test_path`: this fraction (stratified per class) is held out."""
    split_seed: Int = Field(12345, ge=0, le=2**62 - 1)
    """Own data: the seed of the held-out split (never the run's seed)."""
    image_size: Int | None = Field(None, ge=1)
    """Own data: resize (shorter side) and centre-crop every image to image_size^2."""
    channels: Literal[1, 3] | None = None
    """Own data: 1 (grey) or 3 (RGB); images are converted. None: what the data hold."""
    hflip: bool = False
    """Own data: add every training image's mirror image (horizontal-flip augmentation)."""
    classes: list[str] | None = None
    """Own folder data: the class folder names in label order (what silos that lack a class
    need so that every silo numbers the classes alike); None: integer folder names are
    their labels, other names are numbered in sorted order."""

    @model_validator(mode="after")
    def _check_combination(self):
        problem = data_problem(self)
        if problem:
            raise ValueError(problem)
        return self


class ModelConfig(Strict):
    kind: Literal["mlp", "unet", "diffusers-unet", "fi-paper"] = "mlp"
    size: str = "tiny"
    """Named size for the U-Net ("tiny", "small", "paper"); ignored by the MLP."""
    conditional: bool = False
    """Class-conditional on the dataset's labels (federated inference's agents are)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model's constructor (e.g. hidden, depth)."""
    num_classes: Int | None = Field(None, ge=1)
    """The number of labels a class-conditional model knows; it wins over what the data
    show (a silo that lacks the highest class builds the same label table). None: the
    dataset's number of classes."""
    pretrained: str | None = None
    """kind diffusers-unet: a local diffusers UNet2DModel / UNet2DConditionModel folder whose
    weights are theta_0 (nothing is downloaded)."""


class DiffusionConfig(Strict):
    grid: Literal["uniform", "exponential", "ddpm-linear"] = "exponential"
    steps: Int = Field(100, ge=1)
    T: Float | None = Field(5.0, gt=0)
    delta: Float | None = Field(1e-3, gt=0)
    parameterisation: Literal["eps", "score"] = "eps"
    weighting: Literal["paper", "eps"] = "eps"

    @model_validator(mode="after")
    def _check_times(self):
        if self.grid == "ddpm-linear":
            return self
        if self.T is None or self.delta is None:
            raise ValueError(f"the {self.grid!r} grid needs both T and delta")
        if self.delta >= self.T:
            raise ValueError(f"delta must be smaller than T (got delta={self.delta}, T={self.T})")
        return self

    def grid_kwargs(self) -> dict[str, Any]:
        """Arguments for diffusion.time_grid (ddpm-linear takes its T and delta from betas)."""
        if self.grid == "ddpm-linear":
            return {"name": self.grid, "steps": self.steps}
        return {"name": self.grid, "steps": self.steps, "T": self.T, "delta": self.delta}


class TrainConfig(Strict):
    steps: Int = Field(2000, ge=1)
    """Optimiser steps of centralised training."""
    batch_size: Int = Field(256, ge=1)
    lr: Float = Field(2e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    ema_decay: Float | None = Field(None, ge=0, lt=1)
    checkpoint_every: Int = Field(500, ge=1)
    log_every: Int = Field(50, ge=1)
    eval_batch: Int = Field(512, ge=1)
    """Size of the fixed held-out batch on which eq. 9 is reported."""


class SampleConfig(Strict):
    method: Literal["exp-integrator", "euler-maruyama", "ancestral", "pf-ode", "pf-ode-heun"] = (
        "exp-integrator"
    )
    grid: Literal["uniform", "exponential", "ddpm-linear"] = "exponential"
    steps: Int = Field(100, ge=1)
    n: Int = Field(2000, ge=1)
    clip_denoised: bool = False
    """Clip the denoised estimate of x_0 to [-1, 1] at every step (diffusion.clip_denoised;
    images only)."""


class PartitionConfig(Strict):
    scheme: Literal["iid", "dirichlet", "shards", "homogeneous", "dominant", "all",
                    "natural"] = "iid"
    """"natural": the silos the data give (own data: a folder level or the .npz `group`
    array), one per worker."""
    alpha: Float = Field(0.5, gt=0)
    """Dirichlet concentration (scheme: dirichlet)."""
    classes_per_worker: Int = Field(2, ge=1)
    """Classes per worker (scheme: shards)."""


class SecAggConfig(Strict):
    """Flower's SecAgg+ (`SecAggPlusWorkflow`) for eq. 8's sums: values are clipped to
    [-clipping_range, clipping_range] and quantised to integers below quantization_range."""

    num_shares: Int | Float = Field(1.0, gt=0)
    """Shares of each worker's secret: a count (int > 1) or a fraction of the workers."""
    reconstruction_threshold: Int | Float = Field(0.67, gt=0)
    """Shares needed to unmask: a count or a fraction of num_shares; fewer surviving
    workers than this and the round fails (SecAgg+'s dropout tolerance)."""
    clipping_range: Float = Field(8.0, gt=0)
    quantization_range: Int = Field(2**22, ge=2, le=2**30)
    scale: Float = Field(1.0, gt=0)
    """Values are multiplied by `scale` before SecAgg+'s clipping and divided after, to fit
    parameters into the clipping range."""


class PrivacyConfig(Strict):
    """Differential privacy (issue 19): DP-FedAvg (`mode: client`: each worker's update
    clipped to L2 norm `clip` over its kept coordinates, Gaussian noise of std
    noise_multiplier * clip on eq. 8's sum) or DP-SGD (`mode: sample`: per-sample gradients
    of eq. 7's local steps clipped to `clip`, noise of std noise_multiplier * clip on their
    sum). Epsilon at `delta` from a maintained accountant (Opacus)."""

    mode: Literal["client", "sample"]
    clip: Float = Field(gt=0)
    noise_multiplier: Float | None = Field(None, gt=0)
    """z; or leave it None and give `target_epsilon` (z is then solved by the accountant)."""
    target_epsilon: Float | None = Field(None, gt=0)
    delta: Float = Field(1e-5, gt=0, lt=1)
    noise: Literal["central", "distributed"] = "central"
    """mode client: the server adds the noise to the sum (central), or every worker adds its
    share N(0, z^2 C^2 / N) so that the sum carries it (distributed: with SecAgg+, the
    server never sees an un-noised sum)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    """None (the default): the noise comes from a secret key each process draws from the OS
    (`secrets`), so nobody who knows the config can regenerate and subtract it. A number
    makes the noise reproducible from the config — for tests and debugging only: it is then
    NOT private against anyone who has the config (a warning says so)."""

    @model_validator(mode="after")
    def _one_noise_setting(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier (z > 0) and target_epsilon")
        return self


class FederationConfig(Strict):
    """Federated training with arbitrary pruning (SPEC §2, eqs. 7-8)."""

    workers: Int = Field(10, ge=1)
    rounds: Int = Field(20, ge=1)
    local_steps: Int = Field(5, ge=1)
    """S, in optimiser steps; `local_epochs` overrides it when set."""
    local_epochs: Float | None = Field(None, gt=0)
    """S in passes over the worker's data: S = ceil(epochs * n_worker / batch_size)."""
    batch_size: Int = Field(32, ge=1)
    lr: Float = Field(1e-3, gt=0)
    optimizer: Literal["sgd", "adam"] = "adam"
    adam_state: Literal["keep", "reset"] = "reset"
    """Adam moments per worker kept across rounds, or reset every round."""
    policy: Literal["full", "random", "topk"] = "topk"
    level: Literal["F", "L", "M", "S"] | None = "M"
    keep_ratios: list[Float] | None = None
    """Explicit keep ratio per worker (overrides `level`)."""
    uncovered: Literal["keep", "zero", "error"] = "keep"
    strategy: Literal["auto", "vmap", "chunked", "sequential", "threads"] = "auto"
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    max_update_norm: Float | None = Field(None, gt=0)
    """Optional bound on the L2 norm of a worker's update (its kept values minus theta_q's);
    a reply beyond it is dropped and logged like any other invalid reply (a finite but
    hostile update). None: no bound."""
    eval_every: Int = Field(1, ge=1)
    """Rounds between held-out eq. 9 evaluations (the last round is always evaluated); each
    costs about as much as a few local steps of every worker."""
    secure_aggregation: bool = False
    """Flower only: eq. 8's two sums (of theta_n * m_n and of m_n) computed by Flower's
    SecAgg+, so the server never sees one worker's values or mask (`secagg` settings)."""
    secagg: SecAggConfig = Field(default_factory=lambda: SecAggConfig())

    def eval_due(self, q: int) -> bool:
        """Is held-out eq. 9 evaluated after round q (0-based)?"""
        return (q + 1) % self.eval_every == 0 or q + 1 == self.rounds

    @model_validator(mode="after")
    def _check_ratios(self):
        if self.keep_ratios is not None:
            if len(self.keep_ratios) != self.workers:
                raise ValueError(
                    f"keep_ratios has {len(self.keep_ratios)} entries for {self.workers} workers"
                )
            if not all(0 < r <= 1 for r in self.keep_ratios):
                raise ValueError("every keep ratio must be in (0, 1]")
        elif self.level is None:
            raise ValueError("set either a pruning level (F, L, M, S) or keep_ratios")
        return self


class TheoryConfig(Strict):
    """Opt-in measurement of Theorem 1's constants during federated training."""

    estimate: bool = False
    every: Int = Field(10, ge=1)
    """Observe the constants every `every` rounds (and at the end)."""
    full_batch: Int = Field(512, ge=1)
    """Samples per worker for the "full" gradients (in chunks of at most 256)."""


class RunConfig(Strict):
    name: str = Field("run", pattern=NAME_PATTERN)
    """The run folder's name under `out_dir`: letters, digits, '.', '_', '-'."""
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    out_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    federation: Literal["none"] | FederationConfig = "none"
    """"none" for centralised training; the federated engine's settings otherwise."""
    privacy: PrivacyConfig | None = None
    """Differential privacy of federated training (None: none)."""
    theory: TheoryConfig = Field(default_factory=TheoryConfig)
    device: str = "auto"
    """Where the job runs: "auto" (CUDA when present, else the CPU), "cpu", "cuda",
    "cuda:N" or "mps" (`fedscore.runtime.resolve`)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """The network's compute precision (autocast): "auto" is bf16 where the device has bf16
    arithmetic, else fp32. Master weights, optimiser state, eq. 8 and metrics stay fp32.
    fp32 by default: the exactness checks (GMM ground truth) are fp32 runs."""

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @model_validator(mode="after")
    def _check_privacy(self):
        p = self.privacy
        if p is None:
            return self
        if not isinstance(self.federation, FederationConfig):
            raise ValueError(
                "privacy protects the workers of a federation, but this config has "
                "`federation: none` (centralised training); add a federation section or "
                "remove `privacy`")
        if p.mode == "sample" and p.noise == "distributed":
            raise ValueError(
                "privacy.noise: distributed splits DP-FedAvg's noise over the workers (mode "
                "client); mode sample adds its noise inside each worker's steps: set "
                "privacy.noise: central (or mode: client)")
        if self.theory.estimate:
            raise ValueError(
                "theory.estimate reads the workers' raw gradients outside the privacy "
                "mechanism and writes them into the run's log; set theory.estimate: false "
                "for a private run")
        return self


def describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        if e["type"] == "literal_error" and isinstance(e.get("input"), dict):
            continue  # the "none" branch of a `none | settings` union: not what was meant
        # pydantic names union branches and validators in the path; users name fields
        field = ".".join(str(p) for p in e["loc"] if "[" not in str(p)) or "(top level)"
        if field == "name" and e["type"] in ("string_pattern_mismatch", "string_type"):
            got = e.get("input")  # `--set name=` reads as YAML's null
            got = "an empty name" if got in (None, "") else repr(got)
            lines.append(f"  name: a run name is one folder name: letters, digits, '.', '_' "
                         f"and '-', starting with a letter or digit (got {got}); "
                         "choose the parent folder with --out")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (check its spelling)")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a section's own check (its fields together): its message says it all, the
            # whole section repeated after it would not help
            lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["train.steps=100", "name=x"] -> nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FedscoreError(f"override {pair!r} must look like key.sub=value")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `--set train.steps=1 --set train.steps.x=1`
                section = ".".join(parents[: i + 1])
                raise FedscoreError(f"override {pair!r}: {section} was set to a value by "
                                    "an earlier override, it has no keys")
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(
            merged.get(k), dict
        ) else v
    return merged


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; a missing file, bad YAML or a non-mapping is one
    FedscoreError naming `what` ("config file", "experiment preset") and the path."""
    path = Path(path)
    if not path.is_file():
        raise FedscoreError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise FedscoreError(f"{what} {str(path)!r} is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise FedscoreError(f"{what} {str(path)!r} is not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise FedscoreError(f"{what} {str(path)!r} must hold a mapping of settings")
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any
) -> RunConfig:
    """Read a YAML config (or defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        raw, source = read_yaml(path, "config file"), str(path)
    raw = merge(raw, parse_overrides(overrides or []))
    raw = merge(raw, fields)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise FedscoreError(describe(err, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--dry-run` prints and run folders keep)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_from_text(text: str, source: str = "config text") -> RunConfig:
    """A resolved config from its YAML text (what a Flower server sends its workers)."""
    try:
        raw = yaml.safe_load(text) or {}
        return RunConfig.model_validate(raw)
    except yaml.YAMLError as err:
        raise FedscoreError(f"{source} is not valid YAML: {err}") from err
    except ValidationError as err:
        raise FedscoreError(describe(err, source)) from None
