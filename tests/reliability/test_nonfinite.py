"""Never a non-finite model on disk: a divergence names its real cause (the loss, an update
that overflowed the parameters, an output that overflows) and a checkpoint that really is
good, writes nothing non-finite, and marks the run folder failed with that reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedscore.config import load_config
from fedscore.errors import DivergenceError
from fedscore.runs import checkpoint as ckpt
from fedscore.runs import train as train_mod
from fedscore.runs.federated import save_final, save_round, train_federated
from fedscore.runs.folder import RunFolder
from fedscore.runs.train import train_central

SRC = Path(__file__).resolve().parents[2] / "src"


def toy_cfg(tmp_path, name="run", **train):
    return load_config(
        None, name=name, out_dir=str(tmp_path), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 16, "depth": 1}},
        diffusion={"grid": "exponential", "steps": 5, "T": 5.0, "delta": 1e-3},
        train={"batch_size": 16, "lr": 2e-3, "checkpoint_every": 1, "log_every": 1,
               "eval_batch": 16, "optimizer": "sgd", **train},
    )


def fed_cfg(tmp_path, name="fed", rounds=2, **fed):
    return load_config(
        None, name=name, out_dir=str(tmp_path), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 16, "depth": 1}},
        diffusion={"grid": "exponential", "steps": 5, "T": 5.0, "delta": 1e-3},
        train={"eval_batch": 16},
        federation={"workers": 2, "rounds": rounds, "local_steps": 2, "batch_size": 16,
                    "lr": 2e-3, "optimizer": "sgd", "policy": "topk", "level": "M", **fed},
    )


def state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def with_lr(cfg, lr, steps):
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"lr": lr, "steps": steps})})


@pytest.mark.parametrize("lr", [1e30, 1e38])
def test_a_huge_finite_lr_writes_no_model_and_says_there_is_no_good_checkpoint(tmp_path, lr):
    """The issue's case: one SGD step with a huge lr used to exit 0 with a broken
    model.safetensors. The parameters stay finite (|w| ~ lr/2) but the model's output
    overflows: held-out eq. 9 is NaN, so nothing is written."""
    cfg = toy_cfg(tmp_path, steps=1, lr=lr)
    with pytest.raises(DivergenceError) as err:
        train_central(cfg, progress=False)
    text = str(err.value)
    assert "diverged at step 1" in text and "output overflows" in text
    assert "no good checkpoint" in text and "without --resume" in text
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists()
    assert not (run / "checkpoint.safetensors").exists()
    assert not (run / "metrics.jsonl").exists()  # no log line of a broken model either
    assert state(run)["state"] == "failed" and "diverged at step 1" in state(run)["reason"]
    # the documented recovery: start again without --resume, with a lower lr
    train_central(with_lr(cfg, 2e-3, 1), progress=False)
    assert state(run)["state"] == "finished" and (run / "model.safetensors").is_file()


def test_the_named_checkpoint_is_the_last_verified_one_and_really_is_finite(tmp_path):
    """checkpoint_every=1: the checkpoint named after a divergence is the last one written
    with finite weights (step 3), never one of the blow-up."""
    cfg = toy_cfg(tmp_path, steps=3)
    train_central(cfg, progress=False)
    good = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    with pytest.raises(DivergenceError) as err:
        train_central(with_lr(cfg, 1e38, 8), resume=True, progress=False)
    assert "(step 3, verified finite)" in str(err.value)
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == good
    tensors, st = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert st["step"] == 3 and ckpt.nonfinite(tensors) == []
    # lowering the lr and resuming is the documented recovery
    train_central(with_lr(cfg, 1e-3, 5), resume=True, progress=False)
    assert state(tmp_path / "run")["state"] == "finished"


def test_an_update_that_overflows_is_diagnosed_as_such_not_as_a_loss(tmp_path, monkeypatch):
    """Fault injected: the optimiser's 3rd update writes an infinity into a weight (what an
    overflowing update does). The message blames the update of step 3, not the loss."""
    real = train_mod.make_optimizer

    def overflowing(cfg, model):
        opt = real(cfg, model)
        step, calls = opt.step, []

        def bad_step(*a, **k):
            out = step(*a, **k)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")
            return out

        opt.step = bad_step
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", overflowing)
    with pytest.raises(DivergenceError) as err:
        train_central(toy_cfg(tmp_path, steps=6, checkpoint_every=2), progress=False)
    text = str(err.value)
    assert "step 3" in text and "non-finite" in text and "update overflowed" in text
    assert "the loss became" not in text
    assert "(step 2, verified finite)" in text
    tensors, st = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert st["step"] == 2 and ckpt.nonfinite(tensors) == []


def test_a_nan_loss_with_finite_parameters_is_diagnosed_as_the_loss(tmp_path, monkeypatch):
    real, calls = train_mod.diffusion.dsm_loss, []

    def nan_at_4(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train_mod.diffusion, "dsm_loss", nan_at_4)
    with pytest.raises(DivergenceError) as err:
        train_central(toy_cfg(tmp_path, steps=6), progress=False)
    text = str(err.value)
    assert "diverged at step 4: the loss became nan" in text and "parameters are finite" in text
    assert "(step 3, verified finite)" in text
    assert state(tmp_path / "run")["state"] == "failed"


def test_the_cli_exits_2_with_one_line_and_no_model(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-c", "from fedscore.cli import main; main()", "train",
           "--out", str(out), "--set", "train.steps=1", "--set", "train.lr=1e30",
           "--set", "train.optimizer=sgd", "--set", "model.options={hidden: 16, depth: 1}",
           "--set", "train.batch_size=16", "--set", "train.eval_batch=16",
           "--set", "diffusion.steps=5", "--set", "device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fedscore: error:")]
    assert len(errors) == 1 and "diverged at step 1" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (out / "model.safetensors").exists()


def test_federated_divergence_names_its_cause_and_no_good_checkpoint(tmp_path):
    cfg = fed_cfg(tmp_path, lr=1e38)
    with pytest.raises(DivergenceError) as err:
        train_federated(cfg, progress=False)
    text = str(err.value)
    assert "round 1" in text and "no good checkpoint" in text and "federation.lr" in text
    run = tmp_path / "fed"
    assert not (run / "checkpoint.safetensors").exists()
    assert not (run / "model.safetensors").exists()
    assert state(run)["state"] == "failed" and "round 1" in state(run)["reason"]


def test_federated_divergence_names_the_verified_checkpoint(tmp_path):
    cfg = fed_cfg(tmp_path, rounds=1)
    train_federated(cfg, progress=False)
    good = (tmp_path / "fed" / "checkpoint.safetensors").read_bytes()
    blown = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"rounds": 3, "lr": 1e38})})
    with pytest.raises(DivergenceError) as err:
        train_federated(blown, resume=True, progress=False)
    assert "(round 1, verified finite)" in str(err.value)
    assert (tmp_path / "fed" / "checkpoint.safetensors").read_bytes() == good


def test_the_federated_save_paths_refuse_non_finite_weights(tmp_path):
    """Whoever calls them (the in-process run, the Flower ServerApp): no checkpoint and no
    model.safetensors of a NaN model."""
    folder = RunFolder(tmp_path)
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(DivergenceError, match="not finite"):
        save_round(folder, bad, 1, None)
    with pytest.raises(DivergenceError, match="not finite"):
        save_final(folder, bad)
    assert list(tmp_path.iterdir()) == []
