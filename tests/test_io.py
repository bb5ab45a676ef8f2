"""fedscore.io: a write either publishes the whole new file or leaves the old one, and never
leaves a temporary file behind."""

import json
import math

import pytest

from fedscore.io import atomic_write, atomic_write_json, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_interrupted_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "new.txt"

    def interrupted(tmp):
        raise KeyboardInterrupt  # BaseException: Ctrl-C mid-write cleans up too

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert list((tmp_path / "sub").iterdir()) == []


def test_text_and_json_round_trip_and_replace_the_old_content(tmp_path):
    path = tmp_path / "a" / "b.json"  # missing parent folders are made
    atomic_write_text(path, "first, longer content")
    atomic_write_json(path, {"x": [1, 2.5], "nan": math.nan})
    back = json.loads(path.read_text())
    assert back["x"] == [1, 2.5] and math.isnan(back["nan"])
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_a_new_file_gets_the_umasks_permissions_and_a_replaced_file_keeps_its_own(tmp_path):
    """A run's outputs are shared by a team: a new file is what open() would make (0o666
    less the umask), not the temporary file's private 0o600; a file its owner made private
    (or read-only) keeps that mode when it is rewritten."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        fresh = tmp_path / "config.yaml"
        atomic_write_text(fresh, "a")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        os.umask(0o077)
        private = tmp_path / "private.json"
        atomic_write_json(private, {"a": 1})
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    fresh.chmod(0o440)
    atomic_write_text(fresh, "b")
    assert fresh.read_text() == "b"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o440
