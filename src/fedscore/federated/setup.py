"""What every party of a federated run derives from the run config alone (SPEC §2).

`model_setup(cfg)` needs no data: the model (sized by `data.shape_and_classes`: the config
first, `model.num_classes` winning over the data; weights from the run seed), the keep
ratios, the time grid, the per-(round, worker) masks. It is all a server needs: the Flower
ServerApp regenerates random masks from it and never loads a dataset.

`prepare(cfg)` adds the data side: the training split, the worker partition, the loss and
S; the in-process engine holds all of it, a SuperNode prepares it once for its own worker
(`worker_round` is its part of a round, eq. 7, the engine's sequential code path).

All randomness comes from generators seeded by (run seed, round, worker, stream), one per
local step for the mini-batches and their noise, so the in-process engine, a resumed run
and N SuperNodes each drawing only their own share draw exactly the same masks, batches and
noise. A round's batches are drawn per local step (`batches.RoundBatches`), never a round
ahead; the data (images, labels, partition indices) are moved to the runtime's device once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.config import FederationConfig, RunConfig
from fedscore.errors import FedscoreError
from fedscore.federated.batches import RoundBatches
from fedscore.federated.levels import level_ratios
from fedscore.federated.local import local_update, thread_replicas
from fedscore.federated.masks import build_masks
from fedscore.federated.optim import Optimizer, make_optimizer
from fedscore.federated.seeding import MASKS, seed_for
from fedscore.models.build import build_model_for
from fedscore.privacy.dpsgd import check_runtime as check_dpsgd_runtime
from fedscore.privacy.plan import PrivacyPlan, plan_for
from fedscore.runtime import CPU_FP32, Runtime

Params = dict[str, Tensor]

log = logging.getLogger(__name__)


def keep_ratios(fed: FederationConfig) -> list[float]:
    """Each worker's keep ratio: the config's explicit list, or its pruning level's."""
    if fed.keep_ratios is not None:
        return list(fed.keep_ratios)
    return level_ratios(fed.level, n_workers=fed.workers)


def local_steps(fed: FederationConfig, sizes: list[int]) -> int:
    """S: the configured steps, or local epochs over the largest worker's data."""
    if fed.local_epochs is None:
        return fed.local_steps
    return max(1, math.ceil(fed.local_epochs * max(sizes) / fed.batch_size))


def size_notes(cfg: RunConfig, train_sizes: list[int], test_size: int | None = None,
               ) -> list[str]:
    """What a config's batch sizes do to data smaller than them (issue 16 item 6), as
    warnings to log and record, not errors: both are well defined, but should not be silent.

    train_sizes: the images each worker holds (one entry: centralised training). A batch
    larger than that is drawn with replacement like every batch (`batches.RoundBatches`), so
    it repeats images, each copy with its own time and noise. test_size: the test split; a
    larger train.eval_batch evaluates held-out eq. 9 on the whole split (what
    `runs.train.held_out_batch` takes)."""
    federated = isinstance(cfg.federation, FederationConfig)
    key, batch = (("federation.batch_size", cfg.federation.batch_size) if federated
                  else ("train.batch_size", cfg.train.batch_size))
    notes = []
    small = [(n, size) for n, size in enumerate(train_sizes) if size < batch]
    if small:
        who = (", ".join(f"worker {n} ({size})" for n, size in small[:5])
               + (f" and {len(small) - 5} more" if len(small) > 5 else "")
               if federated else f"the training split ({small[0][1]})")
        notes.append(f"{key}={batch} is larger than the images held by {who}: their "
                     f"mini-batches repeat images (drawn with replacement, each copy with its "
                     f"own time and noise); lower {key} to avoid it")
    if test_size is not None and cfg.train.eval_batch > test_size:
        notes.append(f"train.eval_batch={cfg.train.eval_batch} is larger than the test split "
                     f"of {cfg.data.name!r} ({test_size} images): held-out eq. 9 is evaluated "
                     f"on all {test_size}")
    return notes


def partition_kwargs(fed: FederationConfig) -> dict:
    """The scheme-specific arguments of `data.partition` for a federation config."""
    if fed.partition.scheme == "dirichlet":
        return {"alpha": fed.partition.alpha}
    if fed.partition.scheme == "shards":
        return {"classes_per_worker": fed.partition.classes_per_worker}
    return {}


def worker_parts(cfg: RunConfig, labels) -> list:
    """The workers' index arrays of the training split: `data.partition` with the config's
    scheme, and for scheme "natural" the silos the data give (`data.groups`). The one call
    that training and the evaluation's per-silo statistics make, so both see the same silos."""
    fed = _federation(cfg)
    kw = partition_kwargs(fed)
    if fed.partition.scheme == "natural":
        kw["groups"] = datasets.groups(cfg.data, "train")
    return datasets.partition(labels, fed.partition.scheme, n_workers=fed.workers,
                              seed=cfg.seed, **kw)


def make_loss(model: nn.Module, cfg: RunConfig, total_time: float,
              runtime: Runtime = CPU_FP32):
    """loss(params, batch) for the engine; batch = (x0, y, t, eps) of one worker and step.
    The network runs under `runtime.autocast()`; the loss is returned in float32."""
    weighting = cfg.diffusion.weighting
    parameterisation = cfg.diffusion.parameterisation
    conditional = cfg.model.conditional
    module = thread_replicas(model)  # safe for the engine's "threads" strategy

    def loss(params: Params, batch: tuple[Tensor, ...]) -> Tensor:
        x0, y, t, eps = batch
        score = diffusion.ScoreModel(module(), parameterisation, y if conditional else None,
                                     params=params)

        def net(x: Tensor, tt: Tensor) -> Tensor:
            with runtime.autocast():
                out = score.net_fn(x, tt)
            return out.float()

        return diffusion.dsm_loss(net, x0, t, eps, weighting=weighting,
                                  parameterisation=parameterisation, total_time=total_time)

    return loss


def round_batches(
    images: Tensor, labels: Tensor, parts: list[Tensor], steps: int, batch: int,
    times: Tensor, weighting: str, run_seed: int, round_: int,
    workers: list[int] | None = None,
) -> RoundBatches:
    """Round `round_`'s S mini-batches and their DSM noise per worker, drawn per (worker,
    step) when the engine takes them; sizes (N, S) like `draw_batches`' (N, S, B, ...).

    workers: the worker ids of `parts` (default 0..N-1); each (worker, step) draws from its
    own seed, so a SuperNode drawing only its own part gets what the in-process run drew."""
    ids = list(range(len(parts))) if workers is None else list(workers)
    return RoundBatches(images, labels, parts, ids, steps, batch, times, weighting,
                        run_seed, round_)


def draw_batches(
    images: Tensor, labels: Tensor, parts: list[Tensor], steps: int, batch: int,
    times: Tensor, weighting: str, run_seed: int, round_: int,
    workers: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`round_batches` all drawn at once, stacked (N, S, B, ...): the same numbers, in
    memory at once (small runs, benchmarks; the engine takes the lazy source)."""
    return round_batches(images, labels, parts, steps, batch, times, weighting, run_seed,
                         round_, workers).materialise()


@dataclass
class ModelSetup:
    """The data-free part of a federated run: model, initial theta_0, keep ratios, grid."""

    cfg: RunConfig
    model: nn.Module
    init_params: Params
    ratios: list[float]
    times: Tensor
    runtime: Runtime

    @property
    def fed(self) -> FederationConfig:
        return self.cfg.federation

    def optimizer(self) -> Optimizer:
        """The workers' optimiser the config names (eq. 7's SGD, or masked Adam)."""
        return make_optimizer(self.fed.optimizer, lr=self.fed.lr)

    def masks(self, params: Params, q: int, workers: list[int]) -> Params:
        """m_{q,n} of the given workers, stacked (len(workers), ...), each from its own seed
        (random masks: the server regenerates what a worker drew, nothing is sent)."""
        gens = [torch.Generator().manual_seed(seed_for(self.cfg.seed, q, n, MASKS))
                for n in workers]
        cpu = {k: v.detach().cpu() for k, v in params.items()}  # the generators are CPU's
        masks = build_masks(cpu, self.fed.policy, [self.ratios[n] for n in workers], gens)
        return {k: v.to(self.runtime.device) for k, v in masks.items()}


@dataclass
class FederationSetup(ModelSetup):
    """ModelSetup plus the data side: training images, labels, the workers' partition
    (index tensors), all on the runtime's device, the loss and S."""

    images: Tensor = None
    labels: Tensor = None
    parts: list[Tensor] = None
    loss_fn: object = None
    steps: int = 0
    notes: list[str] = field(default_factory=list)
    """`size_notes` of this federation (already logged): for the run folder to record."""
    privacy: PrivacyPlan | None = None
    """The run's differential privacy (`privacy.plan_for`: z given or solved), None: none."""

    def batches(self, q: int, workers: list[int]) -> RoundBatches:
        """Round q's batches (x0, y, t, eps) of the given workers, sizes (len, S): each
        (worker, step) drawn when a local step takes it, on the runtime's device."""
        return round_batches(self.images, self.labels, [self.parts[n] for n in workers],
                             self.steps, self.fed.batch_size, self.times,
                             self.cfg.diffusion.weighting, self.cfg.seed, q, workers=workers)


def _federation(cfg: RunConfig) -> FederationConfig:
    if not isinstance(cfg.federation, FederationConfig):
        raise FedscoreError("this config has `federation: none`; use centralised training")
    return cfg.federation


def model_setup(cfg: RunConfig, runtime: Runtime = CPU_FP32) -> ModelSetup:
    """The model a federated config names (`data.shape_and_classes`: the config's sizes
    first, so a server without data and a silo lacking a class build the same shapes),
    theta_0 from the run seed (drawn on the CPU, then moved to `runtime.device`, so every
    device starts from the same weights), the keep ratios and the training grid."""
    fed = _federation(cfg)
    shape, classes = datasets.shape_and_classes(cfg)
    model = build_model_for(cfg.model, shape, classes, seed=cfg.seed)
    model.to(runtime.device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return ModelSetup(cfg=cfg, model=model, init_params=params, ratios=keep_ratios(fed),
                      times=diffusion.time_grid(**cfg.diffusion.grid_kwargs()),
                      runtime=runtime)


def prepare(cfg: RunConfig, own_data: tuple[Tensor, Tensor] | None = None,
            runtime: Runtime = CPU_FP32) -> FederationSetup:
    """The run's model setup plus its data, partition, loss and S.

    own_data: (images, labels) a worker holds itself (a hospital's SuperNode pointed at its
    own folder): it replaces the dataset and the partition; every worker slot is all of it.
    runtime: where the workers train and in what precision (chosen once by the caller).
    A class-conditional model's labels must lie below its number of classes (one clear
    error otherwise, naming model.num_classes).
    """
    fed = _federation(cfg)
    if cfg.privacy is not None and cfg.privacy.mode == "sample":
        check_dpsgd_runtime(runtime)  # before the model and data are built
    base = model_setup(cfg, runtime)
    if own_data is None:
        images, labels = datasets.load(cfg.data, split="train")
        parts = [torch.as_tensor(p, dtype=torch.long)
                 for p in worker_parts(cfg, labels.numpy())]
    else:
        images, labels = own_data
        parts = [torch.arange(len(images))] * fed.workers
    if cfg.model.conditional:
        where = "this worker's own data" if own_data is not None else "the training data"
        datasets.check_labels(labels, datasets.shape_and_classes(cfg)[1], where)
    total_time = float(base.times[0] - base.times[-1])
    device = runtime.device  # the data live where the workers train, once
    sizes = [len(p) for p in parts]
    # the held-out batch is drawn where the dataset is (not on a worker holding its own data)
    test_size = None if own_data is not None else datasets.info(cfg.data).n["test"]
    notes = size_notes(cfg, sizes, test_size)
    steps = local_steps(fed, sizes)
    plan = plan_for(cfg, sizes, steps)  # bad privacy settings refused before any file
    for note in notes:
        log.warning(note)
    return FederationSetup(
        **vars(base), images=images.to(device), labels=labels.to(device),
        parts=[p.to(device) for p in parts],
        loss_fn=make_loss(base.model, cfg, total_time, runtime),
        steps=steps, notes=notes, privacy=plan,
    )


def worker_round(f: FederationSetup, params: Params, q: int, n: int, opt_state: dict | None = None):
    """Worker n's part of round q (eq. 7), what a Flower SuperNode runs: its mask, its
    batches (drawn per step, the in-process engine's draws), `federated.local_update` (the
    engine's sequential path; under DP-SGD, its clipped and noised per-sample gradients).
    Returns (theta_{q,n,S}, mask, opt state, losses (S,)). Mode client's clipping and noise
    are applied to what leaves the worker (`privacy.client_contribution`) or by the server."""
    mask = {k: v[0] for k, v in f.masks(params, q, [n]).items()}
    batch = f.batches(q, [n])[0]
    fed = f.fed
    theta, state, losses = local_update(
        params, mask, batch, f.loss_fn, f.optimizer(), steps=f.steps,
        state=None if fed.adam_state == "reset" else opt_state,
        dp=f.privacy.dpsgd(q, [n]) if f.privacy is not None else None,
    )
    return theta, mask, state, losses
