"""Federated training runs on the in-process engine (SPEC §2): the round loop, in one place.

Per round q: masks from the policy (eq. 7's m_{q,n}), every worker's S local steps on its
own partition (one vectorised call per step, or a copy-free loop, chosen by the engine),
eq. 8's coordinate-wise aggregation, then the round's record in metrics.jsonl and an atomic
checkpoint. All randomness comes from generators seeded by (run seed, round, worker), so a
resumed run redraws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from fedscore import data as datasets
from fedscore import diffusion, federated
from fedscore.errors import FedscoreError
from fedscore.federated.seeding import DATA, MASKS, seed_for
from fedscore.models.build import build_model_for, save_weights
from fedscore.runs import checkpoint as ckpt
from fedscore.runs.config import FederationConfig, RunConfig
from fedscore.runs.folder import RunFolder
from fedscore.runs.train import DivergenceError, eval_eq9, held_out_batch


@dataclass
class FederatedResult:
    folder: RunFolder
    model: nn.Module
    params: dict[str, Tensor]
    gamma_star: int
    final_loss: float
    eq9: float


def keep_ratios(fed: FederationConfig) -> list[float]:
    if fed.keep_ratios is not None:
        return list(fed.keep_ratios)
    return federated.level_ratios(fed.level, n_workers=fed.workers)


def local_steps(fed: FederationConfig, sizes: list[int]) -> int:
    """S: the configured steps, or local epochs over the largest worker's data."""
    if fed.local_epochs is None:
        return fed.local_steps
    return max(1, math.ceil(fed.local_epochs * max(sizes) / fed.batch_size))


def make_loss(model: nn.Module, cfg: RunConfig, total_time: float):
    """loss(params, batch) for the engine; batch = (x0, y, t, eps) of one worker and step."""
    weighting = cfg.diffusion.weighting
    parameterisation = cfg.diffusion.parameterisation
    conditional = cfg.model.conditional

    def loss(params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        x0, y, t, eps = batch

        def net(x: Tensor, tt: Tensor) -> Tensor:
            return functional_call(model, params, (x, tt, y if conditional else None))

        return diffusion.dsm_loss(net, x0, t, eps, weighting=weighting,
                                  parameterisation=parameterisation, total_time=total_time)

    return loss


def draw_batches(
    images: Tensor, labels: Tensor, parts: list[Tensor], steps: int, batch: int,
    times: Tensor, weighting: str, run_seed: int, round_: int,
    workers: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every worker's S mini-batches and their DSM noise, stacked (N, S, B, ...).

    workers: the worker ids of `parts` (default 0..N-1); each worker's draws come from its
    own seed, so a SuperNode drawing only its own part gets what the in-process run drew."""
    xs, ys, ts, es = [], [], [], []
    ids = range(len(parts)) if workers is None else workers
    for n, idx in zip(ids, parts, strict=True):
        g = torch.Generator().manual_seed(seed_for(run_seed, round_, n, DATA))
        pick = idx[torch.randint(len(idx), (steps, batch), generator=g)]
        x0 = images[pick]  # (S, B, ...)
        t, eps = diffusion.draw_noise(x0.flatten(0, 1), times, weighting, g)
        xs.append(x0)
        ys.append(labels[pick])
        ts.append(t.reshape(steps, batch))
        es.append(eps.reshape(x0.shape))
    return torch.stack(xs), torch.stack(ys), torch.stack(ts), torch.stack(es)


@dataclass
class Federation:
    """What every party of a federated run derives from the config alone, deterministically:
    the in-process loop, a Flower server and every SuperNode build the same one."""

    cfg: RunConfig
    images: Tensor
    labels: Tensor
    parts: list[Tensor]
    model: nn.Module
    init_params: dict[str, Tensor]
    ratios: list[float]
    times: Tensor
    loss_fn: object
    steps: int

    @property
    def fed(self) -> FederationConfig:
        return self.cfg.federation


def prepare(cfg: RunConfig, own_data: tuple[Tensor, Tensor] | None = None) -> Federation:
    """The run's data, partition, model, keep ratios, grid, loss and S.

    own_data: (images, labels) a worker holds itself (a hospital's SuperNode pointed at its
    own folder): it replaces the dataset and the partition; every worker slot is all of it.
    """
    fed = cfg.federation
    if not isinstance(fed, FederationConfig):
        raise FedscoreError("this config has `federation: none`; use centralised training")
    if own_data is None:
        images, labels = datasets.load(cfg.data.name, split="train",
                                       data_root=cfg.data.data_root, download=cfg.data.download)
        parts_np = datasets.partition(labels.numpy(), fed.partition.scheme,
                                      n_workers=fed.workers, seed=cfg.seed,
                                      **partition_kwargs(fed))
        parts = [torch.as_tensor(p, dtype=torch.long) for p in parts_np]
    else:
        images, labels = own_data
        parts = [torch.arange(len(images))] * fed.workers
    model = build_model_for(cfg.model, tuple(images.shape[1:]), int(labels.max()) + 1,
                            seed=cfg.seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    times = diffusion.time_grid(**cfg.diffusion.grid_kwargs())
    return Federation(
        cfg=cfg, images=images, labels=labels, parts=parts, model=model, init_params=params,
        ratios=keep_ratios(fed), times=times,
        loss_fn=make_loss(model, cfg, float(times[0] - times[-1])),
        steps=local_steps(fed, [len(p) for p in parts]),
    )


def worker_masks(f: Federation, params: dict[str, Tensor], q: int,
                 workers: list[int]) -> dict[str, Tensor]:
    """m_{q,n} of the given workers, stacked (len(workers), ...), each from its own seed."""
    gens = [torch.Generator().manual_seed(seed_for(f.cfg.seed, q, n, MASKS)) for n in workers]
    return federated.build_masks(params, f.fed.policy, [f.ratios[n] for n in workers], gens)


def round_batches(f: Federation, q: int, workers: list[int]):
    """Round q's pre-drawn batches (x0, y, t, eps) of the given workers, (len, S, B, ...)."""
    return draw_batches(f.images, f.labels, [f.parts[n] for n in workers], f.steps,
                        f.fed.batch_size, f.times, f.cfg.diffusion.weighting, f.cfg.seed, q,
                        workers=workers)


def worker_round(f: Federation, params: dict[str, Tensor], q: int, n: int,
                 opt_state: dict | None = None):
    """Worker n's part of round q (eq. 7), what a Flower SuperNode runs: its mask, its
    batches, `federated.local_update` (the engine's sequential path). Returns (theta_{q,n,S},
    mask, opt state, losses (S,))."""
    mask = {k: v[0] for k, v in worker_masks(f, params, q, [n]).items()}
    batch = tuple(b[0] for b in round_batches(f, q, [n]))
    fed = f.fed
    theta, state, losses = federated.local_update(
        params, mask, batch, f.loss_fn, lr=fed.lr, steps=f.steps, optimizer=fed.optimizer,
        opt_state=None if fed.adam_state == "reset" else opt_state,
    )
    return theta, mask, state, losses


def write_partition(folder: RunFolder, f: Federation) -> None:
    labels = f.labels.numpy()
    parts = [p.numpy() for p in f.parts]
    datasets.plot_partition(labels, parts, folder.path / "partition.png")
    folder.write_json("partition.json", {
        "sizes": [len(p) for p in parts],
        "class_histogram": datasets.class_histogram(labels, parts).tolist(),
    })


def resume_state(folder: RunFolder, params: dict[str, Tensor]):
    """(params, opt state, rounds done, Gamma*) from a run folder's checkpoint."""
    tensors, state = ckpt.load_checkpoint(folder.checkpoint)
    saved = ckpt.unprefixed("model", tensors)
    if set(saved) != set(params) or any(saved[k].shape != v.shape for k, v in params.items()):
        raise FedscoreError(
            f"checkpoint {str(folder.checkpoint)!r} does not fit this config's model"
        )
    opt_tensors = ckpt.unprefixed("opt", tensors)
    opt_state = _unflatten_opt(opt_tensors) if opt_tensors else None
    folder.truncate_metrics("round", int(state["round"]))
    # the model's own order
    return {k: saved[k] for k in params}, opt_state, int(state["round"]), state["gamma_star"]


def save_round(folder: RunFolder, params: dict[str, Tensor], rounds_done: int,
               gamma_star: int | None, opt_state: dict | None = None) -> None:
    """The per-round atomic checkpoint (model, optionally stacked Adam state)."""
    tensors = ckpt.prefixed("model", params)
    if opt_state is not None:
        tensors |= ckpt.prefixed("opt", _flatten_opt(opt_state))
    ckpt.save_checkpoint(folder.checkpoint, tensors,
                         {"round": rounds_done, "gamma_star": gamma_star})


def save_final(folder: RunFolder, params: dict[str, Tensor]) -> None:
    ckpt.atomic_write(folder.path / "model.safetensors", lambda tmp: save_weights(params, tmp))


def check_finite(folder: RunFolder, fed: FederationConfig, q: int, worker_loss: list[float],
                 params: dict[str, Tensor], workers: list[int] | None = None) -> None:
    """Stop a diverging run with a diagnosis (the last good checkpoint stays)."""
    ids = workers if workers is not None else list(range(len(worker_loss)))
    bad = [n for n, v in zip(ids, worker_loss) if not math.isfinite(v)]
    if bad or not all(torch.isfinite(v).all() for v in params.values()):
        raise DivergenceError(
            f"federated training diverged in round {q + 1}: worker(s) {bad or 'all'} "
            f"produced a non-finite loss or parameters. The last good checkpoint is kept "
            f"in {str(folder.checkpoint)!r}; lower federation.lr (now {fed.lr}) and resume"
        )


def train_federated(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True, folder: RunFolder | None = None
) -> FederatedResult:
    """Run cfg.federation's rounds; returns the final global model."""
    f = prepare(cfg)
    fed = f.fed
    folder = folder or RunFolder.open(cfg, resume=resume)
    if not resume:
        write_partition(folder, f)
    model, params, loss_fn, steps = f.model, f.init_params, f.loss_fn, f.steps
    eval_x, eval_y = held_out_batch(cfg, cfg.train.eval_batch)

    opt_state = None
    start, gamma_star = 0, None
    if resume:
        params, opt_state, start, gamma_star = resume_state(folder, params)

    estimator = _estimator(cfg, loss_fn, steps)
    theory_batches = (_full_batches(cfg, f.images, f.labels, f.parts, f.times)
                      if estimator else None)
    everyone = list(range(fed.workers))

    bar = tqdm(range(start, fed.rounds), initial=start, total=fed.rounds, disable=not progress,
               desc=f"federated {cfg.name}")
    loss_value, eq9 = float("nan"), float("nan")
    for q in bar:
        t0 = time.perf_counter()
        masks = worker_masks(f, params, q, everyone)
        batches = round_batches(f, q, everyone)
        if fed.adam_state == "reset":
            opt_state = None
        observed = []
        if estimator is not None and estimator.due(q):
            observed.append(estimator.observe(q, params, theory_batches, batches, masks))
        new_params, _, stats, opt_state, worker_losses = federated.run_round(
            params, masks, batches, loss_fn, lr=fed.lr, steps=steps,
            optimizer=fed.optimizer, opt_state=opt_state, strategy=fed.strategy,
            uncovered=fed.uncovered,
        )
        per_worker = worker_losses.mean(dim=1).tolist()  # (N,)
        check_finite(folder, fed, q, per_worker, new_params)
        params = new_params
        gamma_star = stats["min_coverage"] if gamma_star is None else min(
            gamma_star, stats["min_coverage"])
        model.load_state_dict(params, strict=False)
        eq9 = eval_eq9(cfg, model, eval_x, eval_y, f.times) if fed.eval_due(q) else None
        loss_value = sum(per_worker) / len(per_worker)
        seconds = time.perf_counter() - t0
        record = {"round": q + 1, "loss": loss_value, "worker_loss": per_worker,
                  "eq9_heldout": eq9, "gamma_star": gamma_star, "seconds": seconds,
                  "samples_per_s": fed.workers * steps * fed.batch_size / seconds,
                  **stats}
        if estimator is not None and q == fed.rounds - 1:  # theta_Q, for F(theta_Q)
            observed.append(estimator.observe(q + 1, params, theory_batches, force=True))
        if observed:
            record["theory"] = observed
        folder.log(record)
        save_round(folder, params, q + 1, gamma_star,
                   opt_state if fed.adam_state == "keep" else None)
        bar.set_postfix(loss=f"{loss_value:.4f}", gamma=gamma_star,
                        samples_s=f"{record['samples_per_s']:.0f}")
    save_final(folder, params)
    return FederatedResult(folder, model, params, int(gamma_star or 0), loss_value, eq9)


def _estimator(cfg: RunConfig, loss_fn, steps: int):
    """Theorem 1's constant estimator when the config opts in (normal runs pay nothing)."""
    if not cfg.theory.estimate:
        return None
    from fedscore.theory import Estimator

    return Estimator(loss_fn, every=cfg.theory.every, S=steps, eta=cfg.federation.lr)


def _full_batches(cfg: RunConfig, images, labels, parts, times):
    """Large fixed batches per worker, (N, C, B, ...), for the estimators' "full" gradients
    (drawn once from their own seed stream so training's draws are unchanged)."""
    size = min(cfg.theory.full_batch, 256)
    chunks = max(1, cfg.theory.full_batch // size)
    return draw_batches(images, labels, parts, chunks, size, times, cfg.diffusion.weighting,
                        cfg.seed + 7_919, 0)


def partition_kwargs(fed: FederationConfig) -> dict:
    if fed.partition.scheme == "dirichlet":
        return {"alpha": fed.partition.alpha}
    if fed.partition.scheme == "shards":
        return {"classes_per_worker": fed.partition.classes_per_worker}
    return {}


def _flatten_opt(state) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": v for k, v in value.items()}
        else:
            out[key] = torch.as_tensor(value)
    return out


def _unflatten_opt(tensors: dict[str, Tensor]):
    state: dict = {}
    for key, value in tensors.items():
        if "/" in key:
            head, tail = key.split("/", 1)
            state.setdefault(head, {})[tail] = value
        else:
            state[key] = value
    return state

