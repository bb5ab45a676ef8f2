"""The `fedscore` command line: one small function per command (DESIGN principle 9).

Each command builds a config, calls one library function and prints where its outputs are.
Bad input (a FedscoreError) is printed as one message with exit code 2, never a traceback;
so are faults of the machine a command runs on (a full disk, a folder it may not write, a
damaged safetensors file, too little memory: `fault_message`). Library warnings (a cache
rebuilt, mini-batches larger than a worker's data) are printed as `fedscore: warning: ...`.
Each command imports its machinery inside its own body, so that `fedscore --help` and a
mistyped command answer at once instead of after importing torch, Flower and Ray.

Help texts are markdown (rich_markup_mode="markdown": a docstring's wrapped lines join into
one paragraph instead of keeping their line breaks) with rich's style tags: a '[' that
starts a word is a tag and vanishes (issue 18: "fedscore[simulation]" printed as
"fedscore"), so a literal one is written '\\['. (Plain help, rich_markup_mode=None, would
print typer's own "\\[default: ...]" with its backslash.) `-h` is `--help` everywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from fedscore.errors import FedscoreError, unknown

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _typer(help: str) -> typer.Typer:
    """A command group with the CLI's shared settings: `-h` as `--help`, help when called
    bare, no tracebacks dressed up by typer, no shell-completion options."""
    return typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False, context_settings=HELP_OPTIONS,
                       rich_markup_mode="markdown")


app = _typer("Federated diffusion models: federated training with pruning, federated inference.")


def package_version() -> str:
    """fedscore's version: the installed distribution's, else fedscore.__version__ (a source
    tree on PYTHONPATH without an install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedscore")
    except PackageNotFoundError:
        import fedscore

        return getattr(fedscore, "__version__", "unknown")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fedscore {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print fedscore's version and exit.")] = False,
) -> None:
    # the group's own options; its help text is the Typer's
    pass

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set train.steps=100 (repeatable)."),
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<name>).")]
DeviceOpt = Annotated[str | None, typer.Option(
    help="Where the networks run: auto|cpu|cuda|cuda:N|mps (auto: CUDA when present). "
         "Default: the config's `device`.")]
PrecisionOpt = Annotated[str | None, typer.Option(
    help="The networks' compute precision: auto|fp32|bf16|fp16 (auto: bf16 where the "
         "device has it natively). Default: the config's `precision`.")]
# 2^62 - 1 is config.MAX_SEED (not imported here: --help stays fast)
SeedOpt = Annotated[int, typer.Option(min=0, max=2**62 - 1, help="Seed (0 to 2^62-1).")]
RunDeviceOpt = Annotated[str | None, typer.Option(
    help="Where the networks run: auto|cpu|cuda|cuda:N|mps (default auto: CUDA when "
         "present).")]
RunPrecisionOpt = Annotated[str | None, typer.Option(
    help="The networks' compute precision: auto|fp32|bf16|fp16 (default: the run's).")]


def _runtime_fields(device: str | None, precision: str | None) -> dict:
    """The config keys --device and --precision override (as --set device=... would)."""
    fields = {"device": device, "precision": precision}
    return {k: v for k, v in fields.items() if v is not None}


def _config(config: Path | None, overrides: list[str] | None, out: Path | None,
            device: str | None = None, precision: str | None = None):
    from fedscore.config import load_config

    fields = _runtime_fields(device, precision)
    if out is not None:
        fields |= _out_fields(out)
    return load_config(config, overrides or [], **fields)


def _need_config(command: str, config: Path | None, overrides: list[str] | None,
                 example: str) -> None:
    """A training command called without --config and without --set is a usage error (exit
    code 2): a bare `fedscore train` used to start a 2,000-step toy run nobody asked for
    (issue 18). --set on the built-in defaults stays: it names what it changes."""
    if config is None and not overrides:
        raise click.UsageError(
            f"{command} needs a run config: --config FILE, e.g. --config {example} (the "
            "repository's configs/ folder holds examples), or the built-in defaults changed "
            "with --set KEY=VALUE (--dry-run prints them)",
            ctx=click.get_current_context(silent=True))


def _out_fields(out: Path) -> dict[str, str]:
    """--out as the config's out_dir and name. --out may be any folder; its own name becomes
    the run's name, which must be a safe one (config.NAME_PATTERN). '..' is resolved in the
    text (x/../../y is ../y), so no stray x/ is created on the way; '.' and '..' name the
    folder they stand for."""
    from fedscore.config import NAME_PATTERN

    out = Path(os.path.normpath(out))
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    if not re.match(NAME_PATTERN, out.name):
        raise FedscoreError(
            f"--out {str(out)!r}: the run folder's own name must be letters, digits, '.', '_' "
            f"and '-', starting with a letter or digit (got {out.name!r})")
    return {"out_dir": str(out.parent), "name": out.name}


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and stop.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Train a score model (centralised, or federated when the config has `federation`)."""
    from fedscore.config import dump_config

    cfg = _config(config, set_, out, device, precision)  # bad values first, then usage
    if dry_run:
        typer.echo(dump_config(cfg))
        return
    _need_config("train", config, set_, "configs/toy-gmm.yaml")
    if cfg.federation != "none":
        from fedscore.runs.federated import train_federated

        fed = train_federated(cfg, resume=resume)
        typer.echo(f"trained {cfg.name} ({cfg.federation.workers} workers, "
                   f"{cfg.federation.rounds} rounds): final loss {fed.final_loss:.4f}, "
                   f"held-out eq. 9 {fed.eq9:.4f}, Gamma* {fed.gamma_star}")
        if fed.epsilon is not None:
            typer.echo(f"differential privacy: epsilon {fed.epsilon:.3g} at delta "
                       f"{cfg.privacy.delta:g} ({cfg.privacy.mode} level)")
        typer.echo(f"run folder: {fed.folder.path}")
        return
    from fedscore.runs.train import train_central

    result = train_central(cfg, resume=resume)
    typer.echo(f"trained {cfg.name}: final loss {result.final_loss:.4f}, "
               f"held-out eq. 9 {result.eq9:.4f}")
    typer.echo(f"run folder: {result.folder.path}")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    n: Annotated[int, typer.Option(help="Number of samples.")] = 1000,
    seed: SeedOpt = 0,
    out: Annotated[Path | None, typer.Option(help="Folder for the outputs.")] = None,
    device: RunDeviceOpt = None,
    precision: RunPrecisionOpt = None,
) -> None:
    """Sample a trained run: samples.npz and a grid (images) or scatter (toys)."""
    from fedscore.runs.evaluate import sample_run

    paths = sample_run(run_dir, n, seed=seed, out=out, device=device, precision=precision)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    samples: Annotated[Path | None, typer.Option(
        help="samples.npz to score (default: the run's own); eval.json goes next to it.")] = (
        None),
    out: Annotated[Path | None, typer.Option(
        help="Folder for eval.json (default: the samples' folder).")] = None,
    n: Annotated[int, typer.Option(help="Samples to draw when there are none.")] = 1000,
    seed: SeedOpt = 0,
    inception_weights: Annotated[Path | None, typer.Option(
        help="Local Inception-v3 weights (pytorch-fid's file) for Inception FID/IS.")] = None,
    device: RunDeviceOpt = None,
    precision: RunPrecisionOpt = None,
) -> None:
    """Score a run's samples (FID, KID, IS, precision/recall, or exact toy metrics) against
    the run's data; eval.json goes to --out, else next to the samples, never into another
    run's folder."""
    import json

    from fedscore.runs.evaluate import eval_path, evaluate_run

    scores = evaluate_run(run_dir, samples=samples, n=n, seed=seed,
                          inception_weights=inception_weights, device=device,
                          precision=precision, out=out)
    typer.echo(json.dumps(scores, indent=2, default=str))
    typer.echo(f"eval.json: {eval_path(run_dir, samples, out)}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run folders.")],
    out: Annotated[Path, typer.Option(help="Folder of report.md.")] = Path("runs/report"),
) -> None:
    """One report.md comparing runs: scores, loss curves, pruning statistics, samples."""
    from fedscore.runs.report import report_runs

    typer.echo(f"report: {report_runs(run_dirs, out)}")


@app.command()
def bound(
    run_dir: Annotated[Path | None, typer.Argument(
        help="A federated run trained with theory.estimate: true.")] = None,
    params: Annotated[Path | None, typer.Option(help="YAML of given constants instead.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for bound.md and the plot.")] = None,
) -> None:
    """Theorem 1 / Corollary 1 for a run's measured constants (or given ones): terms, the
    dominant term, conditions, the observed left-hand side beside the bound, a plot vs Q."""
    from fedscore.theory import run_bound

    if (run_dir is None) == (params is None):
        raise FedscoreError("give either a RUN_DIR or --params FILE (one of them)")
    typer.echo(f"bound report: {run_bound(run_dir, params, out)}")


features_app = _typer("Domain feature extractors for FID/IS.")
app.add_typer(features_app, name="features")


@features_app.command("train")
def features_train(
    dataset: Annotated[str, typer.Option(help="Dataset whose classifier to train.")] = "mnist5k",
    device: Annotated[str, typer.Option(
        help="Where it trains: auto|cpu|cuda|cuda:N|mps (always fp32: it is a metric).")] = (
        "auto"),
    data_root: Annotated[Path | None, typer.Option(
        help="Folder holding the dataset in torchvision's layout (mnist, fashion-mnist, "
             "cifar10, svhn); the bundled mnist5k and digits need none.")] = None,
) -> None:
    """Train (or load from the cache) the dataset's feature classifier; print its accuracy."""
    from fedscore.metrics import get_extractor
    from fedscore.runtime import resolve

    extractor = get_extractor(dataset, device=resolve(device, "fp32").device,
                              data_root=data_root)
    state = "meets" if extractor.meets_floor else "is BELOW"
    typer.echo(f"{dataset}: held-out accuracy {extractor.test_accuracy:.4f} "
               f"({state} the floor {extractor.floor})")


data_app = _typer("Datasets: what fedscore reads from a config's data.")
app.add_typer(data_app, name="data")


@data_app.command("show")
def data_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for preview.png (and partition.png).")] = (
        Path("runs/data-show")),
) -> None:
    """What a config's data are as a run reads them: item shape, class folder -> label,
    images per split, class and worker (silo), and a preview grid (plus the partition
    heat-map for a federated config). Nothing is trained."""
    import json

    from fedscore.runs.data_show import show_data

    _need_config("data show", config, set_, "configs/own-shapes.yaml")
    typer.echo(json.dumps(show_data(_config(config, set_, None), out), indent=2))


reproduce_app = _typer("Reproduce the papers' experiments on bundled data.")
app.add_typer(reproduce_app, name="reproduce")


agents_app = _typer("Federated inference: independent agents.")
app.add_typer(agents_app, name="agents")


@agents_app.command("train")
def agents_train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    regime: Annotated[str, typer.Option(
        help="control (one agent, all data), homogeneous or heterogeneous.")] = "heterogeneous",
    agents: Annotated[int, typer.Option(help="Number of agents.")] = 10,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and stop.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Train K class-conditional agents, each alone on its partition (FI paper §4.1)."""
    from fedscore.config import dump_config
    from fedscore.experiments.agents import train_agents

    cfg = _config(config, set_, out, device, precision)
    if dry_run:
        typer.echo(dump_config(cfg), nl=False)
        return
    _need_config("agents train", config, set_, "configs/fi-toy.yaml")
    for run_dir in train_agents(cfg, regime, out, n_agents=agents):
        typer.echo(f"agent: {run_dir}")


@agents_app.command("sample")
def agents_sample(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="The agents: run folders or diffusers folders (a DDPMPipeline folder, e.g. "
             "from `fedscore export`, or a bare unet folder).")],
    out: Annotated[Path, typer.Option(help="Folder for samples.npz and samples.png.")] = Path(
        "runs/fi-samples"),
    aggregator: Annotated[str, typer.Option(
        help="mean, weighted, hybrid, mixture (combined at every step) or route (each "
             "sample drawn by one agent; on Flower one message per agent, none per step)."
    )] = "mixture",
    per_label: Annotated[int, typer.Option(help="Samples per label.")] = 10,
    steps: Annotated[int, typer.Option(help="Exponential-integrator steps.")] = 100,
    seed: SeedOpt = 0,
    device: RunDeviceOpt = None,
    precision: RunPrecisionOpt = None,
    deployment: Annotated[str, typer.Option(
        help="inprocess (all agents in this process), loopback (one Flower SuperNode per "
             "agent on this machine) or simulation (Flower's simulation runtime).")] = (
        "inprocess"),
    step_timeout: Annotated[float, typer.Option(
        help="Flower: seconds to wait for every agent's scores of one step (route: per "
             "step, for the agents' samples).")] = 600.0,
) -> None:
    """Federated inference: sample with the agents combined at every reverse step (on
    Flower: each agent on its own SuperNode, its weights never leaving it)."""
    from fedscore.flower.fi_run import sample_agents_on

    paths = sample_agents_on(run_dirs, out, deployment=deployment, aggregator=aggregator,
                             per_label=per_label, steps=steps, seed=seed, device=device,
                             precision=precision, step_timeout=step_timeout,
                             stream=deployment != "inprocess")
    typer.echo(f"samples: {paths['samples']}\nfigure:  {paths['figure']}")


@agents_app.command("diagnose")
def agents_diagnose(
    run_dirs: Annotated[list[Path], typer.Argument(help="The agents' run folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the tables.")] = Path(
        "runs/diagnostics"),
    aggregator: Annotated[str, typer.Option(help="mean, weighted, hybrid or mixture.")] = (
        "mean"),
    device: RunDeviceOpt = None,
    precision: RunPrecisionOpt = None,
) -> None:
    """The FI paper's score diagnostics (eqs. 9-13): CSV and a table like its Tables 3-4."""
    from fedscore.experiments.agents import diagnose_agents

    md = diagnose_agents(run_dirs, out, aggregator=aggregator, device=device,
                         precision=precision)
    typer.echo(f"diagnostics: {md}")


BudgetOpt = Annotated[str | None, typer.Option(
    help="A budget of the preset (its budgets: section), e.g. cpu or quick.")]
DatasetOpt = Annotated[str | None, typer.Option(
    help="Dataset (bundled: mnist5k, digits); default: the preset's.")]


def _run(preset: str, out: Path, *, budget: str | None = None, dataset: str | None = None,
         seed: int | None = None, device: str | None = None,
         precision: str | None = None) -> None:
    from fedscore.experiments import run_experiment
    from fedscore.experiments.report import seconds_text

    fields = _runtime_fields(device, precision)  # over the preset's shared config
    result = run_experiment(preset, out, budget=budget, dataset=dataset, seed=seed,
                            overrides={"config": fields} if fields else None, echo=typer.echo)
    typer.echo(f"report: {result.report}")
    typer.echo(f"html:   {result.html}")
    typer.echo(f"total wall time: {seconds_text(result.seconds)}")


@reproduce_app.command("federated-inference")
def reproduce_fi(
    dataset: Annotated[str, typer.Option(help="Dataset (bundled: mnist5k, digits).")] = "mnist5k",
    out: Annotated[Path, typer.Option(help="Folder of the agents and the report.")] = Path(
        "runs/federated-inference"),
    budget: Annotated[str, typer.Option(
        help="cpu (agents that draw digits, ~18 min), smoke or quick (seconds).")] = "cpu",
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """The FI paper's experiment: three regimes x four aggregators, IS/FID/unrecognisable
    (the preset `federated-inference`)."""
    _run("federated-inference", out, budget=budget, dataset=dataset, seed=seed,
         device=device, precision=precision)


@reproduce_app.command("pruning")
def reproduce_pruning(
    dataset: Annotated[str, typer.Option(help="Dataset (bundled: mnist5k, digits).")] = "mnist5k",
    out: Annotated[Path, typer.Option(help="Folder of the eight runs and the report.")] = Path(
        "runs/pruning"),
    budget: Annotated[str, typer.Option(help="cpu (~7 min) or quick (seconds).")] = "cpu",
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """The pruning paper's experiment: {Random, Top-k} x levels {F, L, M, S} (the preset
    `pruning`)."""
    _run("pruning", out, budget=budget, dataset=dataset, seed=seed, device=device,
         precision=precision)


experiment_app = _typer("Experiment presets: cells trained, sampled, evaluated and reported "
                        "by one runner.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def experiment_run(
    preset: Annotated[str, typer.Argument(
        help="A shipped preset (pruning, federated-inference, demo) or a YAML file.")],
    budget: BudgetOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder of the experiment (default runs/<preset>).")] = None,
    dataset: DatasetOpt = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=2**62 - 1, help="Seed (default: the preset's).")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Run an experiment preset: train its cells, sample, evaluate, write the report."""
    _run(preset, out or Path("runs") / Path(preset).stem, budget=budget, dataset=dataset,
         seed=seed, device=device, precision=precision)


@experiment_app.command("list")
def experiment_list() -> None:
    """The shipped experiment presets."""
    from fedscore.experiments import preset_names

    typer.echo("\n".join(preset_names()))


flower_app = _typer("Federated training on Flower (SuperLink + SuperNodes).")
app.add_typer(flower_app, name="flower")


@flower_app.command("run")
def flower_run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    deployment: Annotated[str, typer.Option(
        help="loopback (real SuperLink + SuperNodes on 127.0.0.1) or simulation (Flower's "
             "simulation runtime; needs Ray: pip install 'fedscore\\[simulation]').")] = (
        "loopback"),
    nodes: Annotated[int | None, typer.Option(
        help="SuperNodes to start (default: federation.workers).")] = None,
    tls: Annotated[bool, typer.Option(help="Serve the SuperLink over TLS (test CA).")] = False,
    auth: Annotated[bool, typer.Option(help="SuperNode authentication (implies --tls).")] = (
        False),
    resume: Annotated[bool, typer.Option(help="Continue from the run's checkpoint.")] = False,
    round_timeout: Annotated[float, typer.Option(
        help="Seconds the server waits for a round's replies.")] = 600.0,
    start_wait: Annotated[float, typer.Option(
        help="Seconds the server waits for all SuperNodes before round 1.")] = 120.0,
    node_wait: Annotated[float, typer.Option(
        help="Seconds it waits for missing SuperNodes before later rounds.")] = 10.0,
    min_replies: Annotated[int, typer.Option(
        help="Fewer replies than this and a round leaves the model unchanged.")] = 1,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    node_device: Annotated[list[str] | None, typer.Option(
        help="loopback: SuperNode N trains on DEVICE, as N=DEVICE (e.g. 1=cuda:1); "
             "repeatable. The others: the config's device.")] = None,
    client_cpus: Annotated[int | None, typer.Option(
        help="simulation: CPUs each virtual node reserves (Flower's default 2).")] = None,
    client_gpus: Annotated[float | None, typer.Option(
        help="simulation: the fraction of a GPU each virtual node reserves (0.25: four "
             "nodes share one GPU; 0: GPUs hidden from the nodes).")] = None,
) -> None:
    """Run a federated config on Flower on this machine; same run folder as `train`."""
    from fedscore.flower.run import run_flower

    cfg = _config(config, set_, out, device, precision)
    _need_config("flower run", config, set_, "configs/flower-toy.yaml")
    devices = {}
    for item in node_device or []:
        n, sep, dev = item.partition("=")
        if not (sep and n.strip().isdigit() and dev.strip()):
            raise FedscoreError(f"--node-device {item!r} must look like N=DEVICE, e.g. 1=cuda:1")
        devices[int(n)] = dev.strip()
    folder = run_flower(cfg, cfg.run_dir(), deployment=deployment, nodes=nodes,
                        tls=tls or auth, auth=auth, resume=resume, round_timeout=round_timeout,
                        start_wait=start_wait, node_wait=node_wait, min_replies=min_replies,
                        node_devices=devices or None, client_cpus=client_cpus,
                        client_gpus=client_gpus)
    typer.echo(f"run folder: {folder}")


@flower_app.command("app")
def flower_app_dir(
    folder: Annotated[Path, typer.Argument(help="Where to write the Flower app.")],
) -> None:
    """Write the Flower app folder for `flwr run` against your own federation."""
    from fedscore.flower.launch import write_app

    typer.echo(f"Flower app: {write_app(folder)}")


# what fedscore.export.FORMATS holds; checked here so that a wrong --format is refused at
# once, without importing torch and diffusers (a test compares the two)
EXPORT_FORMATS = ("diffusers",)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder (a diffusers model).")],
    out: Annotated[Path, typer.Option(help="Folder to write (unet/ and scheduler/).")],
    format_: Annotated[str, typer.Option(
        "--format", help="What to write: diffusers (a folder DDPMPipeline.from_pretrained "
                         "loads).")] = "diffusers",
    overwrite: Annotated[bool, typer.Option(
        help="Replace --out when it already holds files.")] = False,
) -> None:
    """Export a trained model for another ecosystem: a diffusers folder (UNet + DDPM
    scheduler) of a run whose model is of a diffusers kind."""
    if format_ not in EXPORT_FORMATS:
        raise unknown("export format", format_, EXPORT_FORMATS)
    from fedscore.export import export_run

    folder = export_run(run_dir, out, fmt=format_, overwrite=overwrite)
    typer.echo(f"{format_} folder: {folder}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder of the demo.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="A smoke-test budget (under 2 minutes).")] = (
        False
    ),
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """The main job on mnist5k: a 10-worker federation with top-k pruning (level M) and
    federated inference (mean, mixture) on the same silos, evaluated in one report (the
    preset `demo`)."""
    _run("demo", out, budget="quick" if quick else None, device=device, precision=precision)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def fault_message(err: BaseException) -> str | None:
    """One line for a fault of the machine rather than of the code (issue 16 item 7): a full
    disk (OSError 28 or 122, or safetensors' wrapping of it), a folder or file it may not
    write, other OS errors, a damaged safetensors file, too little memory. None for anything
    else: a bug keeps its traceback."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        reason = err.strerror or str(err)
        if err.errno in DISK_FULL:
            return _disk_full(f"{reason}{where}")
        if err.errno in (errno.EEXIST, errno.ENOTDIR):  # e.g. --out names a file
            return f"{reason}{where}: a folder is needed there, not a file"
        if err.errno in NOT_ALLOWED:
            return (f"{reason}{where}: check its permissions, or choose another folder "
                    "(--out; FEDSCORE_CACHE for the cache)")
        return f"{reason}{where}"
    if type(err).__name__ == "SafetensorError":  # safetensors' one error type, read or write
        os_error = re.search(r"os error (\d+)", str(err))  # its wrapping of an OSError
        if os_error and int(os_error.group(1)) in DISK_FULL:
            return _disk_full(str(err))
        if os_error:
            return f"a safetensors file could not be written or read: {err}"
        return (f"a safetensors file could not be read ({err}); it is damaged, truncated or "
                "not a safetensors file")
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return ("out of memory: lower the batch sizes (train.batch_size, "
                "federation.batch_size, train.eval_batch), the model size or sample.n")
    return None


def _disk_full(detail: str) -> str:
    return (f"the disk is full: {detail}. Files are replaced atomically, so the last "
            "checkpoint is intact: free some space and run the command again (`train "
            "--resume` continues a run from its last checkpoint)")


class _WarningLines(logging.Handler):
    """A warning of the library as one `fedscore: warning: ...` line on the stderr of the
    moment (looked up per line, so a test's captured stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"fedscore: warning: {record.getMessage()}", err=True)


def _print_warnings() -> None:
    """The library's warnings (logger "fedscore") on stderr; informational records stay
    quiet."""
    logger = logging.getLogger("fedscore")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):  # main() called again
        logger.addHandler(_WarningLines(logging.WARNING))


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    """Is an exception of `kind` in err's chain of causes and contexts?"""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _interrupted() -> None:
    typer.echo("fedscore: interrupted; a run keeps its last checkpoint (`fedscore train "
               "--resume` or `fedscore flower run --resume` continues it)", err=True)
    sys.exit(130)


def _fail(message: str) -> None:
    typer.echo(f"fedscore: error: {message}", err=True)
    sys.exit(2)


def main() -> None:
    """Entry point: a FedscoreError, or a fault of the machine (`fault_message`), becomes one
    clear line on stderr and exit code 2."""
    _print_warnings()
    try:
        app()
    except FedscoreError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as done:
        # Typer turns Ctrl-C into a silent exit 130 (an Exit raised from the
        # KeyboardInterrupt): find that cause, so the user still reads what was kept
        if done.code == 130 and _caused_by(done, KeyboardInterrupt):
            _interrupted()
        raise
    except BrokenPipeError:
        # the reader of stdout went away (`fedscore experiment list | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as err:
        message = fault_message(err)
        if message is None:
            raise
        _fail(message)


if __name__ == "__main__":
    main()
