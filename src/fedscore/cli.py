"""The `fedscore` command line: one small function per command (DESIGN principle 9).

Each command builds a config, calls one library function and prints where its outputs are.
Bad input (a FedscoreError) is printed as one message with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedscore.errors import FedscoreError

app = typer.Typer(
    help="Federated diffusion models: federated training with pruning, federated inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set train.steps=100 (repeatable)."),
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<name>).")]


def _config(config: Path | None, overrides: list[str] | None, out: Path | None):
    from fedscore.runs.config import load_config

    fields = {}
    if out is not None:
        fields = {"out_dir": str(out.parent), "name": out.name}
    return load_config(config, overrides or [], **fields)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and stop.")] = False,
) -> None:
    """Train a score model (centralised, or federated when the config has `federation`)."""
    from fedscore.runs.config import dump_config

    cfg = _config(config, set_, out)
    if dry_run:
        typer.echo(dump_config(cfg))
        return
    if cfg.federation != "none":
        from fedscore.runs.federated import train_federated

        fed = train_federated(cfg, resume=resume)
        typer.echo(f"trained {cfg.name} ({cfg.federation.workers} workers, "
                   f"{cfg.federation.rounds} rounds): final loss {fed.final_loss:.4f}, "
                   f"held-out eq. 9 {fed.eq9:.4f}, Gamma* {fed.gamma_star}")
        typer.echo(f"run folder: {fed.folder.path}")
        return
    from fedscore.runs.train import train_central

    result = train_central(cfg, resume=resume)
    typer.echo(f"trained {cfg.name}: final loss {result.final_loss:.4f}, "
               f"held-out eq. 9 {result.eq9:.4f}")
    typer.echo(f"run folder: {result.folder.path}")


reproduce_app = typer.Typer(help="Reproduce the papers' experiments on bundled data.",
                            no_args_is_help=True)
app.add_typer(reproduce_app, name="reproduce")


@reproduce_app.command("pruning")
def reproduce_pruning(
    dataset: Annotated[str, typer.Option(help="Dataset (bundled: mnist5k, digits).")] = "mnist5k",
    out: Annotated[Path, typer.Option(help="Folder of the eight runs and the report.")] = Path(
        "runs/pruning"),
    budget: Annotated[str, typer.Option(help="cpu (~10 min) or quick (seconds).")] = "cpu",
    seed: int = 0,
) -> None:
    """The pruning paper's experiment: {Random, Top-k} x levels {F, L, M, S}."""
    from fedscore.runs.pruning import BUDGETS, reproduce_pruning

    if budget not in BUDGETS:
        raise FedscoreError(f"unknown budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
    report = reproduce_pruning(dataset, out, budget=budget, seed=seed)
    typer.echo(f"report: {report}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder of the demo.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="A smoke-test budget (seconds, not minutes).")] = (
        False
    ),
) -> None:
    """The main job on bundled data: trains, samples, evaluates and writes a report."""
    from fedscore.demo import run_demo

    report = run_demo(out, quick=quick)
    typer.echo(f"report: {report}")


def main() -> None:
    """Entry point: a FedscoreError becomes one clear line on stderr and exit code 2."""
    try:
        app()
    except FedscoreError as err:
        typer.echo(f"fedscore: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("fedscore: interrupted; the last checkpoint is kept", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
