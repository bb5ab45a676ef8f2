"""The run folder as a small state machine (docs/reliability.md): one writer at a time, a
run killed before its first checkpoint restarts cleanly, a finished run is never redone,
a resume is checked whole (config, checkpoint checksums and state, metrics log) before
anything is written, and a full disk is one message."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.io import read_jsonl
from fedscore.runs import checkpoint as ckpt
from fedscore.runs.federated import train_federated
from fedscore.runs.folder import RunFolder
from fedscore.runs.train import train_central

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = {"model": {"kind": "mlp", "options": {"hidden": 16, "depth": 1}},
        "data": {"name": "gmm:ring8"}, "device": "cpu",
        "diffusion": {"grid": "exponential", "steps": 5, "T": 5.0, "delta": 1e-3}}


def toy_cfg(tmp_path, name="run", **train):
    return load_config(None, name=name, out_dir=str(tmp_path), **TINY, train={
        "batch_size": 16, "lr": 2e-3, "checkpoint_every": 2, "log_every": 1, "eval_batch": 16,
        "ema_decay": 0.9, "steps": 4, **train})


def fed_cfg(tmp_path, name="fed", **fed):
    return load_config(None, name=name, out_dir=str(tmp_path), **TINY, train={"eval_batch": 16},
                       federation={"workers": 3, "rounds": 2, "local_steps": 2,
                                   "batch_size": 16, "lr": 2e-3, "adam_state": "keep",
                                   "policy": "topk", "level": "M", **fed})


def changed(cfg, **sections):
    """cfg with {"train": {"steps": 8}}-style changes."""
    update = {}
    for section, values in sections.items():
        if isinstance(values, dict):
            update[section] = getattr(cfg, section).model_copy(update=values)
        else:
            update[section] = values
    return cfg.model_copy(update=update)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


def state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------- one writer, states


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    cfg = toy_cfg(tmp_path)
    first = RunFolder.open(cfg)  # holds the lock, as a running `fedscore train` does
    assert state(first.path)["state"] == "running" and state(first.path)["pid"] == os.getpid()
    with pytest.raises(FedscoreError, match=r"in use by another fedscore run \(pid"):
        train_central(cfg, progress=False)
    first.fail("stopped by the test")
    assert state(first.path) | {"updated": None} == state(first.path) | {
        "state": "failed", "reason": "stopped by the test", "updated": None}
    train_central(cfg, progress=False)  # the lock is free again; no checkpoint: starts over
    assert state(first.path)["state"] == "finished"


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_run_killed_before_its_first_checkpoint_restarts_cleanly(tmp_path):
    """A real `fedscore train` SIGKILLed mid-run, before its first checkpoint: while alive
    a second writer is refused; afterwards --resume says there is nothing to resume and
    a fresh run is accepted and writes one clean log."""
    out = tmp_path / "killed"
    args = ["train", "--out", str(out), "--set", "train.steps=1000000", "--set",
            "train.checkpoint_every=1000000", "--set", "train.log_every=1", "--set",
            "train.batch_size=16", "--set", "train.eval_batch=16", "--set", "device=cpu",
            "--set", "diffusion.steps=5", "--set", "model.options={hidden: 16, depth: 1}"]
    proc = subprocess.Popen([sys.executable, "-c", "from fedscore.cli import main; main()",
                             *args], env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                                          "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").is_file()
                         and len(read_jsonl(out / "metrics.jsonl")) >= 3)
        cfg = load_config(out / "config.yaml")
        with pytest.raises(FedscoreError, match=f"pid {proc.pid}"):
            RunFolder.open(cfg, path=out)  # the live writer holds the lock
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state(out)["state"] == "running" and state(out)["pid"] == proc.pid
    assert not (out / "checkpoint.safetensors").exists()
    small = changed(cfg, train={"steps": 3, "checkpoint_every": 3})
    before = snapshot(out)
    with pytest.raises(FedscoreError, match="before its first checkpoint.*without --resume"):
        train_central(small, resume=True, progress=False)
    assert snapshot(out) == before  # a refusal writes nothing
    train_central(small, progress=False, folder=RunFolder.open(small, path=out))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert state(out)["state"] == "finished" and state(out)["previous"] == "running"


def test_a_finished_run_is_refused_unless_resumed_with_more_steps(tmp_path):
    cfg = toy_cfg(tmp_path)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    before = snapshot(run)
    with pytest.raises(FedscoreError, match="holds a finished run.*--resume"):
        train_central(cfg, progress=False)
    with pytest.raises(FedscoreError, match="finished run.*nothing to resume"):
        train_central(cfg, resume=True, progress=False)
    with pytest.raises(FedscoreError, match="train.steps may only grow"):
        train_central(changed(cfg, train={"steps": 2}), resume=True, progress=False)
    assert snapshot(run) == before
    # more steps continue it, bit-identically to a run of that length from the start
    train_central(changed(cfg, train={"steps": 8}), resume=True, progress=False)
    train_central(changed(cfg, name="whole", train={"steps": 8}), progress=False)
    assert same_weights(run, tmp_path / "whole")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))


def test_a_folder_fedscore_does_not_track_is_never_overwritten(tmp_path):
    cfg = toy_cfg(tmp_path)
    for files in ({"config.yaml": b"name: theirs\n"}, {"model.safetensors": b"weights"},
                  {"metrics.jsonl": b'{"step": 1}\n', "notes.txt": b"mine"}):
        run = tmp_path / "run"
        run.mkdir()
        for name, data in files.items():
            (run / name).write_bytes(data)
        with pytest.raises(FedscoreError, match="never overwritten"):
            train_central(cfg, progress=False)
        assert snapshot(run) == files
        for name in files:
            (run / name).unlink()
        (run / ".lock").unlink()
        run.rmdir()


def test_temp_files_of_a_kill_are_removed_and_others_kept(tmp_path):
    cfg = toy_cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    ours = [run / ".checkpoint.safetensors.x1y2.tmp", run / ".metrics.jsonl.ab.tmp"]
    theirs = run / ".notes.txt.ab.tmp"
    for p in [*ours, theirs]:
        p.write_bytes(b"half")
    train_central(cfg, progress=False)
    assert not any(p.exists() for p in ours) and theirs.read_bytes() == b"half"


# ---------------------------------------------------------------- resume checks


@pytest.mark.parametrize(("change", "fields"), [
    ({"seed": 7}, ["seed (0 -> 7)"]),
    ({"train": {"optimizer": "sgd"}}, ["train.optimizer ('adam' -> 'sgd')"]),
    ({"model": {"options": {"hidden": 32, "depth": 1}}}, ["model.options.hidden (16 -> 32)"]),
    ({"train": {"batch_size": 32, "ema_decay": 0.5}},
     ["train.batch_size (16 -> 32)", "train.ema_decay (0.9 -> 0.5)"]),
])
def test_resume_refuses_a_changed_config_naming_the_fields_and_writes_nothing(
        tmp_path, change, fields):
    cfg = toy_cfg(tmp_path)
    train_central(changed(cfg, train={"steps": 2}), progress=False)
    run = tmp_path / "run"
    before = snapshot(run)
    bad = changed(cfg, **{k: v for k, v in change.items() if k != "seed"})
    if "seed" in change:
        bad = bad.model_copy(update={"seed": change["seed"]})
    with pytest.raises(FedscoreError, match="does not fit its checkpoint") as err:
        train_central(bad, resume=True, progress=False)
    assert all(f in str(err.value) for f in fields), str(err.value)
    assert snapshot(run) == before  # config.yaml above all: it still describes the model


def test_resume_takes_safe_changes_and_stays_bit_identical(tmp_path):
    """lr unchanged but cadence, sampling, device name and theory settings changed: the
    resumed model equals the uninterrupted one."""
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    safe = changed(cfg, train={"steps": 6, "log_every": 2, "checkpoint_every": 3},
                   sample={"steps": 7}, theory={"every": 3})
    train_central(safe, resume=True, progress=False)
    train_central(changed(cfg, name="whole", train={"steps": 6}), progress=False)
    assert same_weights(tmp_path / "run", tmp_path / "whole")
    assert load_config(tmp_path / "run" / "config.yaml").sample.steps == 7


def test_federated_resume_refuses_more_workers_and_a_new_seed(tmp_path):
    """3 -> 5 workers with Adam's moments kept used to mix silently (or IndexError)."""
    cfg = fed_cfg(tmp_path, rounds=1)
    train_federated(cfg, progress=False)
    run = tmp_path / "fed"
    before = snapshot(run)
    more = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"workers": 5, "rounds": 2})})
    with pytest.raises(FedscoreError, match=r"federation.workers \(3 -> 5\)"):
        train_federated(more, resume=True, progress=False)
    with pytest.raises(FedscoreError, match=r"seed \(0 -> 1\)"):
        train_federated(cfg.model_copy(update={"seed": 1}), resume=True, progress=False)
    assert snapshot(run) == before
    train_federated(changed(cfg, federation={"rounds": 2}), resume=True, progress=False)
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_a_torn_metrics_tail_is_cut_and_the_resume_is_bit_identical(tmp_path):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # killed mid-append
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    train_central(changed(cfg, train={"steps": 4}), resume=True, progress=False)
    train_central(changed(cfg, name="whole", train={"steps": 4}), progress=False)
    assert same_weights(run, tmp_path / "whole")
    assert (run / "metrics.jsonl").read_text().count("\n") == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_corrupt_middle_line_of_the_log_is_one_clear_error(tmp_path):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:-3] + "\n" + lines[1] + "\n")
    before = snapshot(run)
    with pytest.raises(FedscoreError, match="line 1 is not valid JSON"):
        train_central(changed(cfg, train={"steps": 4}), resume=True, progress=False)
    assert snapshot(run) == before


def test_a_deleted_metrics_log_is_noticed_and_an_empty_one_accepted(tmp_path):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    (run / "metrics.jsonl").unlink()
    longer = changed(cfg, train={"steps": 4})
    with pytest.raises(FedscoreError, match="metrics.jsonl is missing.*2 record"):
        train_central(longer, resume=True, progress=False)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # one record lost
    with pytest.raises(FedscoreError, match="holds 1 record"):
        train_central(longer, resume=True, progress=False)
    (run / "metrics.jsonl").write_text("")  # the documented way to accept the loss
    train_central(longer, resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [3, 4]


# ---------------------------------------------------------------- checkpoints


def test_flipped_bytes_in_the_tensor_data_are_a_corrupt_checkpoint(tmp_path):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(header + 100, header + 164):  # 64 bytes of tensor data
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    before = snapshot(tmp_path / "run")
    with pytest.raises(FedscoreError, match="is corrupt.*do not match their checksum"):
        train_central(changed(cfg, train={"steps": 4}), resume=True, progress=False)
    assert snapshot(tmp_path / "run") == before


def _rewrite(path: Path, edit) -> None:
    """Rewrite a checkpoint with its metadata edited (checksums kept valid)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = json.loads(meta[ckpt.STATE_KEY])
    meta = edit(meta, state)
    save_file(tensors, str(path), metadata=meta)


def _state(change):
    def edit(meta, state):
        return meta | {ckpt.STATE_KEY: change(state)}
    return edit


MALFORMED = {
    "not JSON": _state(lambda s: "{step: 2"),
    "a list": _state(lambda s: "[2]"),
    "no step": _state(lambda s: json.dumps({k: v for k, v in s.items() if k != "step"})),
    "step a string": _state(lambda s: json.dumps(s | {"step": "2"})),
    "step a boolean": _state(lambda s: json.dumps(s | {"step": True})),
    "step negative": _state(lambda s: json.dumps(s | {"step": -1})),
    "no optimizer": _state(lambda s: json.dumps({k: v for k, v in s.items()
                                                 if k != "optimizer"})),
    "optimizer without groups": _state(lambda s: json.dumps(s | {"optimizer": {}})),
    "groups of another model": _state(lambda s: json.dumps(s | {"optimizer": {
        "param_groups": [{"params": [0]}]}})),
    "checksums not JSON": lambda meta, s: meta | {ckpt.CHECKSUMS_KEY: "{"},
    "no state at all": lambda meta, s: {k: v for k, v in meta.items() if k != ckpt.STATE_KEY},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_state_metadata_is_one_clear_message(tmp_path, case):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    _rewrite(run / "checkpoint.safetensors", MALFORMED[case])
    before = snapshot(run)
    with pytest.raises(FedscoreError) as err:  # never a KeyError, TypeError, ...
        train_central(changed(cfg, train={"steps": 4}), resume=True, progress=False)
    assert str(run / "checkpoint.safetensors") in str(err.value)
    assert snapshot(run)["config.yaml"] == before["config.yaml"]


def test_an_old_checkpoint_without_checksums_still_resumes(tmp_path):
    cfg = toy_cfg(tmp_path, steps=2)
    train_central(cfg, progress=False)
    run = tmp_path / "run"
    _rewrite(run / "checkpoint.safetensors",
             lambda meta, s: {ckpt.STATE_KEY: json.dumps(
                 {k: v for k, v in s.items() if k != "log_records"})})
    train_central(changed(cfg, train={"steps": 4}), resume=True, progress=False)
    train_central(changed(cfg, name="whole", train={"steps": 4}), progress=False)
    assert same_weights(run, tmp_path / "whole")


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                    "message: \"No space left on device\" })"),
])
def test_a_full_disk_while_checkpointing_is_one_message_and_the_checkpoint_is_intact(
        tmp_path, monkeypatch, error):
    cfg = toy_cfg(tmp_path, steps=6)
    real, calls = ckpt.save_file, []

    def filling(body, tmp, metadata):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: the disk is full half-way
            Path(tmp).write_bytes(b"half")
            raise error
        return real(body, tmp, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", filling)
    with pytest.raises(FedscoreError) as err:
        train_central(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    assert str(err.value).startswith(f"no space left on the device while writing {str(path)!r}")
    assert "the previous checkpoint.safetensors is intact" in str(err.value)
    assert ckpt.load_checkpoint(path)[1]["step"] == 2
    assert state(tmp_path / "run")["state"] == "failed"
    assert not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.setattr(ckpt, "save_file", real)
    train_central(cfg, resume=True, progress=False)  # space freed: resume finishes it
    train_central(changed(cfg, name="whole"), progress=False)
    assert same_weights(tmp_path / "run", tmp_path / "whole")


# ---------------------------------------------------------------- the Flower launcher's check


def test_flower_run_reports_the_servers_result_not_a_previous_runs(tmp_path):
    """`fedscore flower run` into a finished folder used to exit 0 because flower.json (left
    by the previous run) existed. The launcher now reads state.json's token: only the state
    THIS run's ServerApp wrote counts, and a refusal carries the server's own line."""
    from fedscore.flower.run import server_result, server_settings
    from fedscore.flower.server_app import token_of

    cfg = toy_cfg(tmp_path)
    settings = server_settings(cfg, tmp_path / "run")
    token = token_of(settings["config"])
    assert token and token in settings["config"].splitlines()[-1]
    folder = RunFolder.open(cfg, token="earlier")
    folder.write_json("flower.json", {"finished": True})
    folder.finish()
    refused = "[fedscore] refused: '/x' holds a finished run; ...\n"
    with pytest.raises(FedscoreError, match="did not run: refused: '/x' holds a finished run"):
        server_result(folder.path, token, refused, tmp_path / "run.log")
    folder = RunFolder.open(cfg, token=token)  # no checkpoint yet: a fresh run may start
    folder.fail("federated training diverged in round 2")
    with pytest.raises(FedscoreError, match="server run failed: federated training diverged"):
        server_result(folder.path, token, "", tmp_path / "run.log")
    folder = RunFolder.open(cfg, token=token)
    folder.finish()
    server_result(folder.path, token, "", tmp_path / "run.log")  # this run finished: no error
