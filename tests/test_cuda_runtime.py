"""CUDA checks (skipped without a CUDA device; benchmarks/gpu_check.sh runs them on a GPU
machine): a federated run on CUDA equals the CPU run to float tolerance, a worker's
prepare(runtime=cuda) round equals its CPU round, and bf16 autocast on CUDA trains finitely."""

import pytest
import torch

from fedscore import runtime
from fedscore.config import load_config
from fedscore.federated.setup import prepare, worker_round
from fedscore.runs.federated import train_federated

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("exact_fp32")]  # tests/conftest.py

CUDA = runtime.Runtime(torch.device("cuda"), "fp32")
# TF32 matmuls (allowed by some torch builds / settings) round to ~1e-3; the checks are fp32
TOL = {"rtol": 2e-4, "atol": 2e-5}


def fed_cfg(tmp_path, name="cuda", **fed):
    return load_config(**{
        "name": name, "out_dir": str(tmp_path), "seed": 5,
        "data": {"name": "gmm:ring8"}, "model": {"kind": "mlp",
                                                 "options": {"hidden": 32, "depth": 2}},
        "diffusion": {"steps": 20}, "train": {"eval_batch": 64},
        "federation": {"workers": 3, "rounds": 2, "local_steps": 3, "batch_size": 16,
                       "lr": 1e-2, "policy": "topk", "level": "M", "optimizer": "adam",
                       **fed},
    })


def unet_cfg(tmp_path, **top):
    return load_config(**{
        "name": "cuda-unet", "out_dir": str(tmp_path), "seed": 1,
        "data": {"name": "digits"}, "model": {"kind": "unet", "size": "tiny"},
        "diffusion": {"steps": 20},
        "federation": {"workers": 2, "rounds": 1, "local_steps": 2, "batch_size": 8,
                       "policy": "random", "level": "S"}, **top,
    })


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_a_federated_run_on_cuda_equals_the_cpu_run(tmp_path, strategy):
    cpu = train_federated(fed_cfg(tmp_path, f"cpu-{strategy}", strategy=strategy).model_copy(
        update={"device": "cpu"}), progress=False, runtime=runtime.CPU_FP32)
    gpu = train_federated(fed_cfg(tmp_path, f"gpu-{strategy}", strategy=strategy).model_copy(
        update={"device": "cuda"}), progress=False, runtime=CUDA)
    assert (gpu.folder.path / "runtime.json").read_text().count("cuda") == 1
    for k, v in cpu.params.items():
        assert gpu.params[k].device.type == "cuda"
        torch.testing.assert_close(gpu.params[k].cpu(), v, **TOL)


def test_a_workers_cuda_round_equals_its_cpu_round(tmp_path):
    """What a SuperNode with node config device='cuda' runs: prepare(runtime=cuda), then
    worker_round; same mask, theta to tolerance, every tensor on the GPU."""
    c = unet_cfg(tmp_path)
    f_cpu, f_gpu = prepare(c), prepare(c, runtime=CUDA)
    theta_c, mask_c, _, loss_c = worker_round(f_cpu, f_cpu.init_params, 0, 1)
    theta_g, mask_g, _, loss_g = worker_round(f_gpu, f_gpu.init_params, 0, 1)
    for k in theta_c:
        assert theta_g[k].device.type == "cuda"
        assert torch.equal(mask_g[k].cpu(), mask_c[k])
        torch.testing.assert_close(theta_g[k].cpu(), theta_c[k], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_on_cuda_trains_finitely(tmp_path):
    rt = runtime.resolve("cuda", "bf16")
    f = prepare(unet_cfg(tmp_path, precision="bf16"), runtime=rt)
    theta, _, _, losses = worker_round(f, f.init_params, 0, 0)
    assert torch.isfinite(losses).all()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in theta.values())


def test_auto_resolves_to_cuda_and_bf16_where_native():
    rt = runtime.resolve("auto", "auto")
    assert rt.device.type == "cuda"
    assert rt.precision == ("bf16" if runtime.bf16_supported(rt.device) else "fp32")
