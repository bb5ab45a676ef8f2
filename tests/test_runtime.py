"""Device and precision, chosen once (`fedscore.runtime`) and passed down."""

import math

import pytest
import torch

from fedscore import runtime
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.runs.federated import train_federated


def test_a_device_this_machine_lacks_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FedscoreError, match=r"'cuda' is not available here; .*cpu"):
        runtime.resolve("cuda")
    with pytest.raises(FedscoreError, match="unknown precision"):
        runtime.resolve("cpu", "fp8")
    assert runtime.resolve("cpu", "bf16").describe() == {"device": "cpu", "precision": "bf16"}


def test_bf16_autocast_trains_the_same_federation_to_nearly_the_same_model(tmp_path):
    """The network's passes in bf16, everything aggregated in fp32: the parameters stay
    fp32, the run is finite and lands near the fp32 run of the same seed. Sequential
    workers: torch.func.vmap of grad under CPU autocast fails in torch 2.14 ("expected
    scalar type BFloat16 but found Float"); which strategy bf16 uses is the speed issue's."""
    def cfg(name):
        return load_config(
            None, name=name, out_dir=str(tmp_path), data={"name": "gmm:ring8"},
            model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
            diffusion={"steps": 20}, train={"eval_batch": 256},
            federation={"workers": 3, "rounds": 3, "local_steps": 3, "batch_size": 64,
                        "lr": 3e-3, "policy": "topk", "level": "M",
                        "strategy": "sequential"})

    fp32 = train_federated(cfg("fp32"), progress=False)
    bf16 = train_federated(cfg("bf16"), progress=False,
                           runtime=runtime.Runtime(precision="bf16"))
    assert all(v.dtype == torch.float32 for v in bf16.params.values())
    assert math.isfinite(bf16.eq9) and bf16.eq9 == pytest.approx(fp32.eq9, rel=0.2)
    assert any(not torch.equal(bf16.params[k], v) for k, v in fp32.params.items())
    assert (bf16.folder.path / "runtime.json").read_text().count("bf16") == 1


def test_centralised_training_takes_the_runtime_too(tmp_path):
    from fedscore.runs.train import train_central

    cfg = load_config(None, name="central-bf16", out_dir=str(tmp_path),
                      data={"name": "gmm:ring8"},
                      model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
                      diffusion={"steps": 20},
                      train={"steps": 20, "batch_size": 64, "eval_batch": 128,
                             "log_every": 10, "checkpoint_every": 20})
    result = train_central(cfg, progress=False, runtime=runtime.Runtime(precision="bf16"))
    assert math.isfinite(result.final_loss) and math.isfinite(result.eq9)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert "bf16" in (result.folder.path / "runtime.json").read_text()


def _fed_config(tmp_path, **top):
    return load_config(
        None, name="fed", out_dir=str(tmp_path), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 16, "depth": 1}},
        diffusion={"steps": 5}, train={"eval_batch": 32},
        federation={"workers": 2, "rounds": 1, "local_steps": 1, "batch_size": 16,
                    "strategy": top.pop("strategy", "auto")}, **top)


def test_the_configs_precision_reaches_the_workers_strategy(tmp_path, monkeypatch):
    """No runtime passed: train_federated resolves the config's, so bf16 on the CPU trains
    the workers in a loop, and a named vmap strategy is refused before any file."""
    import fedscore.runs.federated as federated

    seen = {}

    class Stop(Exception):
        pass

    def transport(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(federated, "InProcessTransport", transport)
    with pytest.raises(Stop):
        train_federated(_fed_config(tmp_path, device="cpu", precision="bf16"), progress=False)
    assert seen["strategy"] == ("threads" if torch.get_num_threads() > 1 else "sequential")
    assert "precision: bf16" in (tmp_path / "fed" / "config.yaml").read_text()

    cfg = _fed_config(tmp_path / "v", device="cpu", precision="bf16", strategy="vmap")
    with pytest.raises(FedscoreError, match="cannot train in bf16 on the CPU"):
        train_federated(cfg, progress=False)
    assert not (tmp_path / "v").exists()


def test_on_device_runs_the_network_in_its_precision_and_returns_fp32():
    """Sampling's wrapper: labels bound on the device, attributes of the agents passed
    through, the score back in fp32 on the inputs' device."""
    from fedscore.runs.sampling import OnDevice, on_device

    class Agents:
        n_agents = 2
        labels = None

        def with_labels(self, labels):
            other = Agents()
            other.labels = labels
            return other

        def weights_for(self, labels):
            return torch.ones(len(labels), 2)

        def __call__(self, x, t, y=None):
            assert torch.is_autocast_cpu_enabled()
            return torch.stack([x.to(torch.bfloat16), -x.to(torch.bfloat16)])

    plain = Agents()
    assert on_device(plain, runtime.CPU_FP32) is plain  # the CPU in fp32: untouched
    wrapped = on_device(plain, runtime.Runtime(precision="bf16")).with_labels(
        torch.tensor([0, 1, 2]))
    assert isinstance(wrapped, OnDevice) and wrapped.n_agents == 2
    assert wrapped.weights_for(torch.tensor([0, 1, 2])).shape == (3, 2)
    out = wrapped(torch.ones(3, 2), torch.ones(3))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2)
    assert not torch.is_autocast_cpu_enabled()
