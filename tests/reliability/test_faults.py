"""Faults at the edges (issue 16 item 7 and the sizes of item 6): a full disk is one message
and the last checkpoint survives it; a damaged mnist5k cache is rebuilt; batches larger than
the data they are drawn from are warned about, not silent."""

import errno
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import fedscore
from cli_harness import run_main
from fedscore.cli import fault_message
from fedscore.config import load_config
from fedscore.data import sources
from fedscore.federated.setup import prepare, size_notes

TINY = ["--set", "model.options={hidden: 8, depth: 1}", "--set", "train.eval_batch=4",
        "--set", "train.batch_size=8", "--set", "train.checkpoint_every=1"]


SRC = str(Path(fedscore.__file__).resolve().parents[1])  # this checkout's code, from any folder




# ---------------------------------------------------------------- a full disk


def test_a_full_disk_mid_resume_is_one_message_and_the_checkpoint_is_untouched(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, None, "train", "--out", str(run), "--set",
                            "train.steps=2", *TINY)
    assert code == 0, err
    saved = (run / "checkpoint.safetensors").read_bytes()

    def full(fd):  # the kernel's answer when the disk fills (fsync can report it too)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, out, err = run_main(monkeypatch, capsys, None, "train", "--out", str(run), "--resume",
                              "--set", "train.steps=4", *TINY)
    monkeypatch.undo()
    assert code == 2
    assert err.startswith("fedscore: error: ") and err.count("fedscore: error:") == 1, err
    assert "disk is full" in err or "space" in err.lower(), err
    assert "Traceback" not in out + err
    assert (run / "checkpoint.safetensors").read_bytes() == saved
    assert not list(run.glob(".*.tmp"))  # the half-written file is gone


def _tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_works(), reason="no unprivileged mount namespace for a tmpfs")
def test_a_really_full_tmpfs_stops_the_run_with_one_message_and_keeps_the_last_checkpoint(
        tmp_path):
    # a 384 KiB tmpfs in a private mount namespace: the first run fits, a filler leaves
    # one 4 KiB page, the resumed run's next checkpoint cannot be written
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    cli = f"{sys.executable} -m fedscore.cli train --out {disk}/run {shlex.join(TINY)}"
    script = f"""
        mount -t tmpfs -o size=384k tmpfs {disk} || exit 90
        {cli} --set train.steps=2 >/dev/null 2>{tmp_path}/first.err || exit 91
        cp {disk}/run/checkpoint.safetensors {tmp_path}/before.safetensors
        free=$(df -k --output=avail {disk} | tail -1)
        dd if=/dev/zero of={disk}/filler bs=1k count=$((free - 4)) 2>/dev/null
        {cli} --resume --set train.steps=40 >/dev/null 2>{tmp_path}/second.err
        echo $? > {tmp_path}/second.rc
        cp -a {disk}/run {kept}
    """
    env = {**os.environ, "FEDSCORE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": SRC}
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stderr, (tmp_path / "first.err").read_text())
    err = (tmp_path / "second.err").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "2", err
    lines = [line for line in err.splitlines() if line.startswith("fedscore: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "space" in err.lower() or "disk is full" in err, err
    # the checkpoint on the full disk is a whole one: the first run's or a later one
    ckpt = load_file(str(kept / "checkpoint.safetensors"))
    before = load_file(str(tmp_path / "before.safetensors"))
    assert set(ckpt) == set(before)
    assert all(np.isfinite(v.numpy()).all() for v in ckpt.values())


@pytest.mark.parametrize("err, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), ["disk is full", "/x/y"]),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), ["disk is full", "quota"]),
    (PermissionError(errno.EACCES, "Permission denied", "/ro"), ["Permission denied", "/ro"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt"), ["Read-only", "--out"]),
    (FileExistsError(errno.EEXIST, "File exists", "f"), ["(f)", "not a file"]),
    (MemoryError(), ["out of memory", "batch"]),
])
def test_faults_of_the_machine_become_one_message(err, words):
    message = fault_message(err)
    assert message is not None and "\n" not in message
    for word in words:
        assert word in message


def test_a_safetensors_disk_full_and_a_damaged_file_are_told_apart():
    from safetensors import SafetensorError

    full = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    torn = SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert "disk is full" in fault_message(full)
    assert "damaged" in fault_message(torn) and "disk" not in fault_message(torn)


def test_a_bug_keeps_its_traceback():
    assert fault_message(ValueError("a bug")) is None
    assert fault_message(KeyError("x")) is None


# ---------------------------------------------------------------- a damaged cache


def _damage_truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 3)


def _damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # 64 bytes of pixels zeroed
    path.write_bytes(bytes(data))


def _damage_foreign(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros((3, 3)), y=np.zeros(3))


def _damage_text(path: Path) -> None:
    path.write_text("not an npz\n")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path))
    sources._mnist5k_arrays.cache_clear()
    yield tmp_path
    sources._mnist5k_arrays.cache_clear()  # later tests read their own cache again


def test_a_damaged_mnist5k_cache_is_rebuilt_from_the_bundled_data(own_cache, caplog):
    reference = sources._mnist5k_arrays()
    (cached,) = (own_cache / "data").glob("mnist5k-*.npz")
    for damage in (_damage_truncate, _damage_flip, _damage_foreign, _damage_text):
        damage(cached)
        sources._mnist5k_arrays.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedscore.data.sources"):
            x, y = sources._mnist5k_arrays()
        assert "is damaged" in caplog.text and "rebuilding" in caplog.text, damage.__name__
        assert np.array_equal(x, reference[0]) and np.array_equal(y, reference[1])
        assert sources._read_mnist5k_cache(cached)[1] is None  # rewritten whole
    assert sorted(p.name for p in (own_cache / "data").iterdir()) == [cached.name]


# ---------------------------------------------------------------- sizes


def _fed(**federation):
    return load_config(None, [], data={"name": "gmm:ring8"},
                       model={"options": {"hidden": 8, "depth": 1}},
                       federation={"workers": 3, "rounds": 1, "local_steps": 1,
                                   "partition": {"scheme": "shards",
                                                 "classes_per_worker": 3}, **federation})


def test_a_batch_larger_than_a_workers_data_is_a_warning_naming_the_workers():
    notes = size_notes(_fed(batch_size=100), [40, 200, 99], test_size=1000)
    assert len(notes) == 1
    assert "federation.batch_size=100" in notes[0]
    assert "worker 0 (40)" in notes[0] and "worker 2 (99)" in notes[0]
    assert "worker 1" not in notes[0] and "with replacement" in notes[0]
    assert size_notes(_fed(batch_size=40), [40, 200, 99], test_size=1000) == []


def test_eval_batch_larger_than_the_test_split_says_the_whole_split_is_used():
    cfg = _fed().model_copy(update={"train": _fed().train.model_copy(
        update={"eval_batch": 5000})})
    (note,) = size_notes(cfg, [10_000], test_size=1000)
    assert "train.eval_batch=5000" in note and "all 1000" in note


def test_centralised_training_names_its_own_batch_key():
    cfg = load_config(None, ["train.batch_size=64"])
    (note,) = size_notes(cfg, [50])
    assert "train.batch_size=64" in note and "training split (50)" in note


def test_prepare_logs_the_notes_and_keeps_them_for_the_run_folder(caplog):
    cfg = _fed(batch_size=3000)
    with caplog.at_level(logging.WARNING, logger="fedscore.federated.setup"):
        f = prepare(cfg)
    assert len(f.notes) == 1 and f.notes[0] in caplog.text
    assert all(f"worker {n}" in f.notes[0] for n in range(3))


def test_centralised_training_logs_its_size_notes_and_keeps_them_in_the_run_folder(
        tmp_path, caplog):
    """`fedscore train` of a config whose eval_batch exceeds the test split: the run goes on
    (eq. 9 on the whole split), the warning is logged and kept in notes.json."""
    from fedscore import data as datasets
    from fedscore.runs.train import train_central

    test_size = datasets.info("gmm:ring8").n["test"]
    cfg = load_config(None, ["train.steps=2", "train.batch_size=8", "train.checkpoint_every=2",
                             "train.log_every=1", f"train.eval_batch={test_size + 5}",
                             f"out_dir={tmp_path}", "name=notes"])
    with caplog.at_level(logging.WARNING, logger="fedscore.runs.train"):
        result = train_central(cfg, progress=False)
    notes = json.loads((result.folder.path / "notes.json").read_text())["warnings"]
    assert len(notes) == 1 and f"train.eval_batch={test_size + 5}" in notes[0]
    assert notes[0] in caplog.text
    assert (result.folder.path / "model.safetensors").is_file()
