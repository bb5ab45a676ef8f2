"""Centralised training (`federation: none`): the baseline every federated run compares to.

One loop, seeded by the run's seed: draw a mini-batch and the DSM noise with the run's
generator, take an optimiser step on the loss of eq. 9 (or DDPM's), log, checkpoint
atomically. Resuming restores parameters, EMA, optimiser moments and the generator, so N
steps equal N/2 + resume + N/2 exactly on the CPU.

Nothing non-finite is ever written (docs/reliability.md): the loss is checked every step,
the parameters and EMA before every checkpoint and before model.safetensors, and held-out
eq. 9 when it is evaluated; a divergence names its cause (the loss, or an update that
overflowed the parameters) and a checkpoint that really is good, and the run folder is
marked failed with that reason.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.config import RunConfig, load_config
from fedscore.errors import DivergenceError, FedscoreError
from fedscore.federated.setup import size_notes
from fedscore.io import atomic_write
from fedscore.models import check_pretrained, ema_update
from fedscore.models.build import build_model_for, load_trained, save_weights
from fedscore.runs import checkpoint as ckpt
from fedscore.runs.folder import RunFolder
from fedscore.runs.plots import image_grid
from fedscore.runs.sampling import model_score_fn, sample_model
from fedscore.runtime import Runtime, from_config, pinned

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    folder: RunFolder
    model: nn.Module
    ema: dict[str, Tensor] | None
    final_loss: float
    eq9: float
    seconds: float


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr)


def held_out_batch(cfg: RunConfig, n: int) -> tuple[Tensor, Tensor]:
    """A fixed held-out batch (test split) on which every run reports eq. 9."""
    images, labels = datasets.load(cfg.data, split="test")
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    idx = torch.randperm(len(images), generator=g)[:n]
    return images[idx], labels[idx]


def eval_eq9(cfg: RunConfig, model: nn.Module, x0: Tensor, y: Tensor, times: Tensor) -> float:
    """Eq. 9's value of `model` on a held-out batch, with noise fixed by the run's seed."""
    model.eval()
    g = torch.Generator().manual_seed(20_000 + cfg.seed)
    value = diffusion.eq9_value(model_score_fn(model, cfg, y), x0, times, g)
    model.train()
    return value


def train_central(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True,
    folder: RunFolder | None = None, indices=None, runtime: Runtime | None = None,
) -> TrainResult:
    """Train one score model on the training split (or the subset `indices` of it, e.g. one
    agent's partition) on `runtime` (device; the network's passes under its autocast,
    weights and Adam in fp32; default: the config's device and precision, resolved);
    returns the trained model. The run folder's config.yaml records the resolved values."""
    runtime = runtime or from_config(cfg)
    cfg = pinned(cfg, runtime)
    # the data are read and checked before the run folder is made: bad data write nothing
    images, labels = datasets.load(cfg.data, split="train")
    # sized by the config first (model.num_classes wins), else the whole dataset, so agents
    # trained on parts of it share one label space
    shape, num_classes = datasets.shape_and_classes(cfg)
    if cfg.model.conditional:
        datasets.check_labels(labels, num_classes, "the training data")
    check_pretrained(cfg.model, shape, num_classes)  # a bad pretrained folder writes nothing
    folder = folder or RunFolder.open(cfg, resume=resume, runtime=runtime)
    with folder.guard():  # finished on return, failed (with the reason) on any error
        return _train(cfg, folder, (images, labels), (shape, num_classes), resume=resume,
                      progress=progress, indices=indices, runtime=runtime)


def _train(cfg: RunConfig, folder: RunFolder, train_data: tuple[Tensor, Tensor],
           sizes: tuple[tuple[int, ...], int], *, resume: bool, progress: bool, indices,
           runtime: Runtime) -> TrainResult:
    folder.write_json("runtime.json", runtime.describe())
    images, labels = train_data
    shape, num_classes = sizes
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images, labels = images[idx], labels[idx]
    model = build_model_for(cfg.model, shape, num_classes, seed=cfg.seed)
    model.to(runtime.device)
    opt = make_optimizer(cfg, model)
    times = diffusion.time_grid(**cfg.diffusion.grid_kwargs())
    total_time = float(times[0] - times[-1])
    g = torch.Generator().manual_seed(cfg.seed)
    ema = (
        {k: v.detach().clone() for k, v in model.named_parameters()}
        if cfg.train.ema_decay is not None
        else None
    )
    start = 0
    if resume:
        start, ema = _restore(cfg, folder, model, opt, g, ema)
        folder.truncate_metrics("step", start)
    eval_x, eval_y = (v.to(runtime.device) for v in held_out_batch(cfg, cfg.train.eval_batch))
    # a batch larger than the data, or a test split smaller than eval_batch: well defined,
    # never silent (logged, and kept in the run folder)
    notes = size_notes(cfg, [len(images)], len(eval_x) if len(eval_x) < cfg.train.eval_batch
                       else None)
    record_notes(folder, notes)

    steps = cfg.train.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress,
               desc=f"train {cfg.name}")
    t0 = time.perf_counter()
    running, seen = 0.0, 0
    loss_value = float("nan")
    for step in bar:
        idx = torch.randint(len(images), (cfg.train.batch_size,), generator=g)
        x0 = images[idx]
        y = labels[idx] if cfg.model.conditional else None
        t, eps = diffusion.draw_noise(x0, times, cfg.diffusion.weighting, g)
        x0, t, eps = x0.to(runtime.device), t.to(runtime.device), eps.to(runtime.device)
        score = model_score_fn(model, cfg, None if y is None else y.to(runtime.device))

        def net(x: Tensor, tt: Tensor, score=score) -> Tensor:
            with runtime.autocast():
                return score.net_fn(x, tt).float()

        loss = diffusion.dsm_loss(
            net, x0, t, eps,
            weighting=cfg.diffusion.weighting,
            parameterisation=cfg.diffusion.parameterisation,
            total_time=total_time,
        )
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise loss_diverged(cfg, folder, model, step + 1, loss_value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema = ema_update(ema, dict(model.named_parameters()), cfg.train.ema_decay)
        running += loss_value
        seen += 1
        done = step + 1
        checkpoint_due = done % cfg.train.checkpoint_every == 0 or done == steps
        if checkpoint_due:  # never a non-finite checkpoint (nor log line of one)
            check_finite(cfg, folder, model, ema, done)
        if done % cfg.train.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - t0
            record = {"step": done, "loss": running / seen,
                      "samples_per_s": seen * cfg.train.batch_size / max(elapsed, 1e-9)}
            if checkpoint_due:
                record["eq9_heldout"] = eval_eq9(cfg, model, eval_x, eval_y, times)
                if not math.isfinite(record["eq9_heldout"]):
                    raise output_diverged(cfg, folder, model, done, record["eq9_heldout"])
            folder.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            samples_s=f"{record['samples_per_s']:.0f}")
            running, seen, t0 = 0.0, 0, time.perf_counter()
        if checkpoint_due:
            _save(cfg, folder, model, opt, g, ema, done)
            folder.good_checkpoint = done
    check_finite(cfg, folder, model, ema, steps)  # model.safetensors: finite weights only
    final = _final_weights(model, ema)
    atomic_write(folder.path / "model.safetensors", lambda tmp: save_weights(final, tmp))
    eq9 = folder.metrics()[-1].get("eq9_heldout", float("nan")) if folder.metrics() else float(
        "nan")
    if images.ndim == 4:
        write_sample_grid(cfg, model, final, folder.path / "samples.png",
                          sample_shape=tuple(images.shape[1:]), num_classes=num_classes,
                          progress=progress, runtime=runtime)
    return TrainResult(folder, model, ema, loss_value, eq9, time.perf_counter() - t0)


def record_notes(folder: RunFolder, notes: list[str]) -> None:
    """Log a run's size warnings (`federated.setup.size_notes`) and keep them in the run
    folder's notes.json (none: no file)."""
    for note in notes:
        log.warning(note)
    if notes:
        folder.write_json("notes.json", {"warnings": notes})


def write_sample_grid(cfg: RunConfig, model: nn.Module, weights: dict[str, Tensor], path: Path,
                      *, sample_shape: tuple[int, ...], num_classes: int, n_per_class: int = 10,
                      progress: bool = False, runtime: Runtime | None = None):
    """A grid of samples from `weights` (one row per class when conditional) at `path`; the
    model's network runs on `runtime` (where the model lies; default the CPU in fp32)."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.load_state_dict(weights, strict=False)
    model.eval()
    n = n_per_class * num_classes
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    images = sample_model(model, cfg, n, seed=cfg.seed, labels=labels,
                          sample_shape=sample_shape, progress=progress, runtime=runtime)
    model.load_state_dict(params, strict=False)
    model.train()
    return image_grid(images, path, nrow=n_per_class, title=f"{cfg.name}: samples by class")


def _largest(model: nn.Module) -> float:
    """The largest finite |w| of the parameters (what a loss overflow grew from)."""
    with torch.no_grad():
        values = [p.detach().nan_to_num(0.0, 0.0, 0.0).abs().max() for p in model.parameters()]
    return float(torch.stack(values).max()) if values else 0.0


def _update_hint(cfg: RunConfig) -> str:
    return f"the update overflowed: train.lr {cfg.train.lr} with {cfg.train.optimizer}"


def loss_diverged(cfg: RunConfig, folder: RunFolder, model: nn.Module, step: int,
                  loss: float) -> DivergenceError:
    """The error for a non-finite loss at `step`: the parameters are checked to tell the
    two causes apart (the loss at step-1 was finite, so non-finite parameters came from the
    update of step-1; finite ones mean the forward pass overflowed)."""
    recovery = folder.recovery("step", "train.lr")
    if bad := _nonfinite_params(model):
        return DivergenceError(
            f"training diverged at step {step - 1}: its update made the parameters non-finite "
            f"({bad[0]!r}, ...; {_update_hint(cfg)}); the loss of step {step} is {loss}. "
            f"{recovery}")
    return DivergenceError(
        f"training diverged at step {step}: the loss became {loss} (the parameters are finite, "
        f"the largest |w| is {_largest(model):.3g}). {recovery}")


def output_diverged(cfg: RunConfig, folder: RunFolder, model: nn.Module, step: int,
                    value: float) -> DivergenceError:
    return DivergenceError(
        f"training diverged at step {step}: held-out eq. 9 is {value}, the model's output "
        f"overflows (finite parameters, the largest |w| is {_largest(model):.3g}; "
        f"{_update_hint(cfg)}); it is not checkpointed. "
        + folder.recovery("step", "train.lr"))


def _nonfinite_params(model: nn.Module) -> list[str]:
    return [k for k, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_finite(cfg: RunConfig, folder: RunFolder, model: nn.Module,
                 ema: dict[str, Tensor] | None, step: int) -> None:
    """Refuse to write parameters or an EMA holding a NaN or an infinity (a DivergenceError
    that names the first such tensor and a checkpoint that really is good)."""
    bad = _nonfinite_params(model)
    bad += [f"ema {k}" for k, v in (ema or {}).items() if not bool(torch.isfinite(v).all())]
    if bad:
        since = folder.good_checkpoint
        raise DivergenceError(
            f"training diverged at step {step}: the parameters are non-finite ({bad[0]!r}, "
            f"...; last verified finite at "
            f"{'step ' + str(since) if since is not None else 'the start'}; {_update_hint(cfg)}"
            f"); nothing was written. " + folder.recovery("step", "train.lr"))


def _final_weights(model: nn.Module, ema: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Weights used for sampling: the EMA when the run keeps one."""
    return ema if ema is not None else {k: v.detach() for k, v in model.named_parameters()}


def _save(cfg, folder, model, opt, g, ema, step) -> None:
    tensors = ckpt.prefixed("model", dict(model.state_dict()))
    opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
    tensors |= ckpt.prefixed("opt", opt_tensors)
    if ema is not None:
        tensors |= ckpt.prefixed("ema", ema)
    tensors["rng/train"] = g.get_state()
    ckpt.save_checkpoint(folder.checkpoint, tensors, {
        "step": step, "optimizer": opt_meta, "optimizer_name": cfg.train.optimizer,
        "log_records": folder.records})


def _restore(cfg, folder, model, opt, g, ema):
    tensors, state = folder.read_checkpoint(ckpt.CENTRAL_STATE)
    where = repr(str(folder.checkpoint))
    try:
        model.load_state_dict(ckpt.unprefixed("model", tensors))
    except RuntimeError as err:
        raise FedscoreError(f"checkpoint {where} does not fit this config's model ({err})"
                            ) from None
    if state.get("optimizer_name", cfg.train.optimizer) != cfg.train.optimizer:
        raise FedscoreError(
            f"the checkpoint was trained with train.optimizer={state['optimizer_name']!r}; "
            f"resume with the same optimizer (the config says {cfg.train.optimizer!r})"
        )
    try:
        ckpt.restore_optimizer(opt, ckpt.unprefixed("opt", tensors), state["optimizer"])
        g.set_state(tensors["rng/train"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ckpt.corrupt(folder.checkpoint, f"it does not restore: {err}") from None
    for group in opt.param_groups:  # a resumed run takes the config's (maybe lowered) lr
        group["lr"] = cfg.train.lr
    if ema is not None:  # on the model's device (checkpoints hold CPU tensors)
        device = next(model.parameters()).device
        ema = {k: v.to(device) for k, v in ckpt.unprefixed("ema", tensors).items()}
        names = {k for k, _ in model.named_parameters()}
        if set(ema) != names:
            raise ckpt.corrupt(folder.checkpoint, "its EMA does not match the model's "
                                                  "parameters")
    folder.confirm()  # restored whole: config.yaml may now describe the resumed run
    return state["step"], ema


def load_model(run_dir: Path) -> tuple[nn.Module, RunConfig]:
    """The trained model of a run folder (EMA weights when kept), ready for sampling, and
    the run's config. The model's size comes from `data.shape_and_classes` (the config
    first; no data loaded when the config sizes it)."""
    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FedscoreError(
            f"{str(run_dir)!r} holds no trained model (model.safetensors); train it first "
            "with `fedscore train --config ...`"
        )
    cfg = load_config(run_dir / "config.yaml")
    shape, classes = datasets.shape_and_classes(cfg)
    model = load_trained(cfg.model, weights, shape, classes,
                         config=repr(str(run_dir / "config.yaml")))
    return model, cfg
