"""The ClientApp on a CUDA SuperNode (skipped without a CUDA device): node config
device='cuda' trains there, the reply is CPU float32 and matches the CPU node's reply to
float tolerance, Adam's moments kept in the node's context come back onto the GPU."""

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")  # the GPU image may lack Flower (benchmarks/gpu_check.sh)
from clientapp_harness import client_round  # noqa: E402
from flwr.app import RecordDict  # noqa: E402

from fedscore.config import load_config  # noqa: E402
from fedscore.federated.setup import model_setup  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("exact_fp32")]  # tests/conftest.py


def test_a_cuda_supernode_replies_in_cpu_fp32_like_a_cpu_one():
    c = load_config(**{
        "device": "cpu", "data": {"name": "digits"}, "model": {"kind": "unet", "size": "tiny"},
        "diffusion": {"steps": 20},
        "federation": {"workers": 2, "rounds": 2, "local_steps": 2, "batch_size": 8,
                       "policy": "topk", "level": "S", "optimizer": "adam",
                       "adam_state": "keep"},
    })
    params = model_setup(c).init_params
    node = {"partition-id": 1, "num-partitions": 2}  # keeps 75% (level S): mask bits travel
    states = {"cpu": RecordDict(), "cuda": RecordDict()}
    for q in range(2):  # round 2 reads the moments round 1 kept in the context
        cpu = client_round(c, params, q, node, states["cpu"])
        gpu = client_round(c, params, q, node | {"device": "cuda"}, states["cuda"])
        assert dict(gpu.content["runtime"])["device"].startswith("cuda")
        got, want = (r.content["payload"]["values"].numpy() for r in (gpu, cpu))
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        assert np.array_equal(gpu.content["payload"]["mask"].numpy(),
                              cpu.content["payload"]["mask"].numpy())
