"""Where a job runs and in what precision: chosen once, by the driver that starts the job
(the federated round loop's caller, centralised training, the experiment harness), and
passed down as one `Runtime`. The maths never asks where it runs.

`precision` is the compute precision of the score network's forward and backward passes
(autocast); master weights, optimiser state, eq. 8's sums and counts and every metric stay
in float32/float64 whatever it says.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fedscore.errors import FedscoreError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise FedscoreError(f"unknown precision {self.precision!r}; choose one of: "
                                f"{', '.join(PRECISIONS)}")

    def autocast(self):
        """The context the network's forward pass runs in: autocast to `precision` on
        `device`, or nothing for fp32."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def describe(self) -> dict:
        """What a run folder records of it."""
        return {"device": str(self.device), "precision": self.precision}


CPU_FP32 = Runtime()
"""The default: what every job ran on before devices and precisions were chosen."""


def resolve(device: str | torch.device = "cpu", precision: str = "fp32") -> Runtime:
    """A Runtime for a device name ("cpu", "cuda", "cuda:N", "mps"); a device this machine
    lacks is a FedscoreError naming the ones it has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FedscoreError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    have = available_devices()
    name = f"{dev.type}:{dev.index}" if dev.index is not None else dev.type
    if name not in have and dev.type not in have:
        raise FedscoreError(f"device {str(device)!r} is not available here; this machine has: "
                            f"{', '.join(have)}")
    return Runtime(dev, precision)


def available_devices() -> list[str]:
    """The device names this machine can run on."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out
