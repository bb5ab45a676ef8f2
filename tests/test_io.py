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
