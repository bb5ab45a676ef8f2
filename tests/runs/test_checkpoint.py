"""Checkpoints are atomic, carry their state, and refuse bad files with one message."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.runs import checkpoint as ckpt


def test_checkpoint_round_trips_tensors_and_state(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {"model/w": torch.randn(3, 4), "rng/train": torch.Generator().get_state()}
    ckpt.save_checkpoint(path, tensors, {"step": 5, "note": [1, 2]})
    back, state = ckpt.load_checkpoint(path)
    assert state == {"step": 5, "note": [1, 2]}
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left


def test_a_truncated_checkpoint_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.randn(100)}, {"step": 1})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FedscoreError, match="corrupt or truncated"):
        ckpt.load_checkpoint(path)
    assert path.read_bytes() == raw[: len(raw) // 2]
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FedscoreError, match="corrupt or truncated"):
        ckpt.load_checkpoint(path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(2)}, {"step": 1})

    def crash(body, tmp, metadata):  # the disk fills up half-way through the new file
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(2)}, {"step": 2})
    tensors, state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_optimizer_state_survives_the_round_trip():
    w = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    tensors, meta = ckpt.optimizer_tensors(opt)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as if read back from a file
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = torch.optim.Adam([w2], lr=0.1)
    ckpt.restore_optimizer(opt2, tensors, meta)
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad()
        (p**2).sum().backward()
        o.step()
    assert torch.equal(w, w2)
