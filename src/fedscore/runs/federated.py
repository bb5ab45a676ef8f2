"""`fedscore train` for a config with a `federation:` section: SPEC §2 on the in-process
engine, written as the one round loop (`federated.loop.run_rounds`) over the in-process
transport, with this run folder's hooks.

Hooks, in order, after every round: held-out eq. 9 (every `federation.eval_every` rounds and
at the end), the opt-in theory estimator, the progress bar, then the run folder's log line
(metrics.jsonl) and atomic checkpoint. The Flower ServerApp runs the same loop with its own
transport and the same run-folder hook (`flower.server_app`).

Device and precision are chosen here, once (`runtime.Runtime`, default: the CPU in fp32),
and passed down to the setup; the run folder's env.json records them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedscore import data as datasets
from fedscore.config import FederationConfig, RunConfig
from fedscore.errors import DivergenceError, FedscoreError
from fedscore.federated.inprocess import InProcessTransport
from fedscore.federated.loop import RoundEvent, run_rounds
from fedscore.federated.optim import state_from_tensors, state_to_tensors
from fedscore.federated.setup import FederationSetup, prepare, round_batches
from fedscore.io import atomic_write
from fedscore.models.build import save_weights
from fedscore.runs import checkpoint as ckpt
from fedscore.runs.folder import RunFolder
from fedscore.runs.train import eval_eq9, held_out_batch
from fedscore.runtime import Runtime, from_config, pinned
from fedscore.theory import Estimator


@dataclass
class FederatedResult:
    folder: RunFolder
    model: nn.Module
    params: dict[str, Tensor]
    gamma_star: int
    final_loss: float
    eq9: float
    epsilon: float | None = None  # at privacy.delta after the last round (None: no privacy)


# ---------------------------------------------------------------- the run folder's side


def write_partition(folder: RunFolder, f: FederationSetup) -> None:
    """partition.png (class heat-map per worker) and partition.json (sizes, histogram)."""
    labels = f.labels.cpu().numpy()
    parts = [p.cpu().numpy() for p in f.parts]
    datasets.plot_partition(labels, parts, folder.path / "partition.png")
    folder.write_json("partition.json", {
        "sizes": [len(p) for p in parts],
        "class_histogram": datasets.class_histogram(labels, parts).tolist(),
    })
    if f.notes:  # already logged by `prepare`; kept beside the partition they describe
        folder.write_json("notes.json", {"warnings": f.notes})


def resume_state(folder: RunFolder, params: dict[str, Tensor]):
    """(params, opt state, rounds done, Gamma*) from a run folder's checkpoint (verified:
    checksums, state, finite weights); the metrics log is cut back to the checkpoint's
    round."""
    tensors, state = folder.read_checkpoint(ckpt.FEDERATED_STATE)
    saved = ckpt.unprefixed("model", tensors)
    if set(saved) != set(params) or any(saved[k].shape != v.shape for k, v in params.items()):
        raise FedscoreError(
            f"checkpoint {str(folder.checkpoint)!r} does not fit this config's model"
        )
    if bad := ckpt.nonfinite(tensors):
        raise FedscoreError(f"checkpoint {str(folder.checkpoint)!r} holds non-finite weights "
                            f"({bad[0]!r}); start the run again without --resume")
    opt_tensors = ckpt.unprefixed("opt", tensors)
    try:
        opt_state = state_from_tensors(opt_tensors, params) if opt_tensors else None
    except (KeyError, ValueError, IndexError, RuntimeError) as err:
        raise ckpt.corrupt(folder.checkpoint, f"its optimiser state does not restore: {err!r}"
                           ) from None
    folder.truncate_metrics("round", int(state["round"]))
    folder.good_checkpoint = int(state["round"])
    folder.confirm()  # restored whole: config.yaml may now describe the resumed run
    # the model's own order, on its device (checkpoints hold CPU tensors)
    params = {k: saved[k].to(v.device) for k, v in params.items()}
    return params, opt_state, int(state["round"]), state["gamma_star"]


def refuse_nonfinite(folder: RunFolder, params: dict[str, Tensor], what: str) -> None:
    """Never write a non-finite model (the round loop already refuses one; this guards every
    save path, whoever calls it)."""
    if bad := [k for k, v in params.items() if not bool(torch.isfinite(v).all())]:
        raise DivergenceError(
            f"refusing to write {what}: parameter {bad[0]!r} is not finite. "
            + folder.recovery("round", "federation.lr"))


def save_round(folder: RunFolder, params: dict[str, Tensor], rounds_done: int,
               gamma_star: int | None, opt_state: dict | None = None) -> None:
    """The per-round atomic checkpoint (model, optionally stacked Adam state); finite
    weights only."""
    refuse_nonfinite(folder, params, f"the checkpoint of round {rounds_done}")
    tensors = ckpt.prefixed("model", params)
    if opt_state:
        tensors |= ckpt.prefixed("opt", state_to_tensors(opt_state, params))
    ckpt.save_checkpoint(folder.checkpoint, tensors,
                         {"round": rounds_done, "gamma_star": gamma_star,
                          "log_records": folder.records})
    folder.good_checkpoint = rounds_done


def save_final(folder: RunFolder, params: dict[str, Tensor]) -> None:
    refuse_nonfinite(folder, params, "model.safetensors")
    atomic_write(folder.path / "model.safetensors", lambda tmp: save_weights(params, tmp))


def folder_hook(folder: RunFolder, keep_opt_state: bool = False):
    """The last hook of a round: its log line in metrics.jsonl, then the atomic checkpoint
    (with the workers' optimiser state when the run carries it across rounds). A held-out
    eq. 9 that is not finite (finite weights whose output overflows) is a divergence: that
    round is neither logged nor checkpointed."""

    def hook(e: RoundEvent) -> None:
        refuse_nonfinite(folder, e.params, f"the checkpoint of round {e.q + 1}")
        value = e.record.get("eq9_heldout")
        if isinstance(value, float) and not math.isfinite(value):
            raise DivergenceError(
                f"federated training diverged in round {e.q + 1}: held-out eq. 9 is {value} "
                "(finite parameters whose output overflows); it is not checkpointed. "
                + folder.recovery("round", "federation.lr"))
        folder.log(e.record)
        save_round(folder, e.params, e.q + 1, e.gamma_star,
                   e.outcome.opt_state if keep_opt_state else None)

    return hook


def eq9_hook(cfg: RunConfig, model: nn.Module, times: Tensor):
    """Held-out eq. 9 of theta_{q+1} when due (`federation.eval_every`, and the last round);
    None in the log otherwise. Needs the test split: it runs where the data are."""
    device = next(model.parameters()).device
    eval_x, eval_y = (t.to(device) for t in held_out_batch(cfg, cfg.train.eval_batch))
    fed = cfg.federation

    def hook(e: RoundEvent) -> None:
        value = None
        if fed.eval_due(e.q):
            model.load_state_dict(e.params, strict=False)
            value = eval_eq9(cfg, model, eval_x, eval_y, times)
        e.record["eq9_heldout"] = value

    return hook


def theory_hook(cfg: RunConfig, f: FederationSetup):
    """Theorem 1's constants at theta_q (every `theory.every` rounds) and at theta_Q, from
    the round's own masks and batches (the transport's lazy source: each step redrawn from
    its seed) plus large fixed batches per worker (drawn a chunk at a time, likewise)."""
    estimator = Estimator(f.loss_fn, every=cfg.theory.every, S=f.steps, eta=cfg.federation.lr)
    size = min(cfg.theory.full_batch, 256)
    chunks = max(1, cfg.theory.full_batch // size)
    # their own seed stream, so training's draws are unchanged; every observation redraws
    # the same chunks, one at a time
    full = round_batches(f.images, f.labels, f.parts, chunks, size, f.times,
                         cfg.diffusion.weighting, cfg.seed + 7_919, 0)

    def hook(e: RoundEvent) -> None:
        observed = []
        if estimator.due(e.q):
            masks, batches = e.outcome.inputs
            observed.append(estimator.observe(e.q, e.before, full, batches, masks))
        if e.q == e.rounds - 1:  # theta_Q, for F(theta_Q)
            observed.append(estimator.observe(e.q + 1, e.params, full, force=True))
        if observed:
            e.record["theory"] = observed

    return hook


def progress_hook(bar):
    def hook(e: RoundEvent) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{e.record['loss']:.4f}", gamma=e.gamma_star,
                        samples_s=f"{e.record.get('samples_per_s', 0):.0f}")

    return hook


# ---------------------------------------------------------------- the in-process run


def workers_strategy(strategy: str, runtime: Runtime) -> str:
    """The engine strategy the workers can run with on `runtime`: where vmap of grad fails
    (`Runtime.vmap_of_grad_works`: a reduced precision on the CPU) the workers train in a
    loop ("threads" or "sequential"): "auto" and "chunked" (a GPU memory bound, as the
    paper configs name it) fall back to that; naming "vmap" there is one clear error
    instead of torch's."""
    if runtime.vmap_of_grad_works:
        return strategy
    if strategy == "vmap":
        raise FedscoreError(
            f"federation.strategy 'vmap' cannot train in {runtime.precision} on the CPU "
            "(vmap under CPU autocast fails in this torch); use strategy: auto, threads or "
            "sequential, or precision fp32")
    if strategy in ("auto", "chunked"):
        return "threads" if torch.get_num_threads() > 1 else "sequential"
    return strategy


def train_federated(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True,
    folder: RunFolder | None = None, runtime: Runtime | None = None,
) -> FederatedResult:
    """Run cfg.federation's rounds in this process on `runtime` (device, precision;
    default: the config's, resolved); returns the final global model (and, with `privacy`,
    its epsilon; every round's record has epsilon, z, C and the clipped fraction)."""
    if isinstance(cfg.federation, FederationConfig) and cfg.federation.secure_aggregation:
        raise FedscoreError(
            "federation.secure_aggregation: true runs on Flower's SecAgg+: use `fedscore "
            "flower run --config ...` (the in-process engine holds every worker's update in "
            "one process, so there is nothing to hide them from)")
    runtime = runtime or from_config(cfg)
    cfg = pinned(cfg, runtime)  # config.yaml records the resolved device and precision
    f = prepare(cfg, runtime=runtime)
    # refuse before any file is written (DP-SGD's own limit is refused by prepare)
    strategy = workers_strategy(f.fed.strategy, runtime)
    folder = folder or RunFolder.open(cfg, resume=resume, runtime=runtime)
    with folder.guard():  # finished on return, failed (with the reason) on any error
        return _train(cfg, f, folder, strategy, resume=resume, progress=progress,
                      runtime=runtime)


def _train(cfg: RunConfig, f: FederationSetup, folder: RunFolder, strategy: str, *,
           resume: bool, progress: bool, runtime: Runtime) -> FederatedResult:
    fed: FederationConfig = f.fed
    folder.write_json("runtime.json", runtime.describe())
    if not resume:
        write_partition(folder, f)
    if f.privacy is not None:  # z (given or solved), sampling rates, planned epsilon
        folder.write_json("privacy.json", f.privacy.summary())
    params, opt_state, start, gamma_star = f.init_params, None, 0, None
    if resume:
        params, opt_state, start, gamma_star = resume_state(folder, params)

    everyone = list(range(fed.workers))
    keep = fed.adam_state == "keep"
    transport = InProcessTransport(
        masks_for=lambda q, theta: f.masks(theta, q, everyone),
        batches_for=lambda q: f.batches(q, everyone),
        loss_fn=f.loss_fn, opt=f.optimizer(), steps=f.steps,
        strategy=strategy,
        keep_state=keep, opt_state=opt_state,
        samples_per_round=fed.workers * f.steps * fed.batch_size,
        keep_inputs=cfg.theory.estimate, privacy=f.privacy,
    )
    bar = tqdm(total=fed.rounds, initial=start, disable=not progress,
               desc=f"federated {cfg.name}")
    hooks = [eq9_hook(cfg, f.model, f.times)]
    if cfg.theory.estimate:
        hooks.append(theory_hook(cfg, f))
    hooks += [progress_hook(bar), folder_hook(folder, keep_opt_state=keep)]
    try:
        out = run_rounds(
            params, transport, rounds=fed.rounds, start=start, gamma_star=gamma_star,
            uncovered=fed.uncovered, hooks=hooks,
            diverged_hint=lambda: folder.recovery("round", "federation.lr"),
            privacy=f.privacy,
        )
    finally:
        bar.close()
    save_final(folder, out.params)
    f.model.load_state_dict(out.params, strict=False)
    last = out.last or (folder.metrics() or [{}])[-1]
    return FederatedResult(folder, f.model, out.params, int(out.gamma_star or 0),
                           last.get("loss", float("nan")),
                           last.get("eq9_heldout") or float("nan"), last.get("epsilon"))
