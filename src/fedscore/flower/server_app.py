"""The Flower ServerApp: SPEC §2's server on Flower's Message API (`@app.main()` + Grid).

Thin by design: it reads the resolved fedscore config from the run config, builds the
data-free model setup (`federated.setup.model_setup`: model, theta_0, keep ratios, mask
seeds — the server loads no dataset), and runs THE round loop (`federated.loop.run_rounds`)
over the Flower transport (`flower.transport`: push, pull, check, add to eq. 8's sums) with
the same run-folder hook as the in-process engine (metrics.jsonl, atomic checkpoint per
round, model.safetensors). Evaluation that needs data (held-out eq. 9) runs where the data
are: on the in-process engine, or afterwards with `fedscore evaluate` on the run folder.

Faults: a SuperNode that dies, errors or answers with a payload that does not fit is dropped
from that round; coverage and Gamma* are computed over the replies that arrived, coordinates
nobody covered keep their value (`uncovered`), the round is logged as degraded, and the run
goes on.

`federation.secure_aggregation: true`: the rounds go through Flower's SecAgg+
(`flower.secure_transport`): the server learns eq. 8's sums and counts, never one worker's
values or mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedscore.config import config_from_text
from fedscore.errors import FedscoreError
from fedscore.federated.loop import RoundEvent, run_rounds
from fedscore.federated.setup import model_setup
from fedscore.flower import secure
from fedscore.flower.secure_transport import SecureFlowerTransport
from fedscore.flower.transport import FlowerTransport
from fedscore.privacy import plan_for
from fedscore.runs.federated import folder_hook, resume_state, save_final
from fedscore.runs.folder import RunFolder

app = ServerApp()


@dataclass
class ServerSettings:
    """The run config keys of the Flower app (pyproject's [tool.flwr.app.config])."""

    config: str  # the resolved fedscore config, YAML text
    out: str  # the run folder, on the machine that runs the ServerApp
    resume: bool = False
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    start_wait: float = 120.0  # seconds to wait for `min_nodes` SuperNodes before round 1
    node_wait: float = 10.0  # the same wait before later rounds (a dead node may not return)
    min_nodes: int = 0  # 0: all `federation.workers`
    min_replies: int = 1  # fewer replies than this: the round changes nothing (degraded)
    poll: float = 0.5  # seconds between pulls of replies (Flower's own loop: 3 s)

    @classmethod
    def from_run_config(cls, rc: dict) -> ServerSettings:
        keys = {f: f.replace("_", "-") for f in cls.__dataclass_fields__}
        return cls(**{f: rc[k] for f, k in keys.items() if k in rc})


TOKEN_LINE = "# fedscore-run-token: "
"""The config text's last line carries the launch's run token (a YAML comment: the config
itself is unchanged), recorded in state.json so `flower.run` can tell this run's result."""


def token_of(config_text: str) -> str | None:
    for line in config_text.splitlines():
        if line.startswith(TOKEN_LINE):
            return line[len(TOKEN_LINE):].strip() or None
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, ServerSettings.from_run_config(dict(context.run_config)))


def print_hook(rounds: int):
    """One line per round on the server's log (what `flwr run --stream` shows)."""

    def hook(e: RoundEvent) -> None:
        r = e.record
        status = "DEGRADED " if r["degraded"] else ""
        print(f"[fedscore] {status}round {e.q + 1}/{rounds}: {r['replies']} replies, "
              f"loss {r['loss']:.4f}, {r['seconds']:.1f} s"
              + (f"; missing workers {r['missing_workers']}" if r["degraded"] else "")
              + (f"; failed: {r['failed']}" if r["failed"] else ""), flush=True)

    return hook


def run_server(grid: Grid, s: ServerSettings) -> Path:
    """The federated run of config `s.config` over the SuperNodes of `grid`, in a run folder
    opened (locked, checked, state "running") like the in-process engine's and marked
    finished or failed (with the reason) at the end. A refusal or failure is also one
    `[fedscore] ...` line on the server's log, for the launcher to report."""
    try:
        cfg = config_from_text(s.config)
        if cfg.federation.secure_aggregation:
            secure.plan(cfg)  # refuse settings SecAgg+ cannot run, before the folder opens
        secure.check_privacy(cfg)
        setup = model_setup(cfg)
        folder = RunFolder.open(cfg, resume=s.resume, path=Path(s.out), token=token_of(s.config))
    except FedscoreError as err:
        print(f"[fedscore] refused: {err}", flush=True)
        raise
    try:
        with folder.guard():
            return _serve(grid, s, setup, folder)
    except Exception as err:
        print(f"[fedscore] failed: {err}", flush=True)
        raise


def _serve(grid: Grid, s: ServerSettings, setup, folder: RunFolder) -> Path:
    fed = setup.fed
    params, start, gamma_star = setup.init_params, 0, None
    if s.resume:
        params, _, start, gamma_star = resume_state(folder, params)
    # DP-FedAvg (privacy mode client) is the server's to account and, with central noise,
    # to noise (the loop's one noise step); DP-SGD (mode sample) runs and is accounted on the
    # workers, which alone know their data's size: the server logs their epsilons
    plan = plan_for(setup.cfg) if setup.cfg.privacy and setup.cfg.privacy.mode == "client" \
        else None
    if plan is not None:
        folder.write_json("privacy.json", plan.summary())
    # the same loop, hooks and run folder either way; only the transport differs
    kind = SecureFlowerTransport if fed.secure_aggregation else FlowerTransport
    transport = kind(
        grid, setup, s.config, round_timeout=s.round_timeout, start_wait=s.start_wait,
        node_wait=s.node_wait, min_nodes=s.min_nodes, min_replies=s.min_replies, poll=s.poll,
        folder_hint=f"the checkpoint is kept in {str(folder.checkpoint)!r}: ",
    )
    if not fed.secure_aggregation:
        transport.privacy = plan  # the server clips each accepted update (central noise)
    out = run_rounds(
        params, transport, rounds=fed.rounds, start=start, gamma_star=gamma_star,
        uncovered=fed.uncovered, hooks=[print_hook(fed.rounds), folder_hook(folder)],
        diverged_hint=lambda: folder.recovery("round", "federation.lr"), privacy=plan,
    )
    save_final(folder, out.params)
    folder.write_json("flower.json", {"rounds": fed.rounds, "gamma_star": out.gamma_star,
                                      "finished": True})
    return folder.path
