"""Where a job runs and in what precision: chosen once, by the driver that starts the job
(the federated round loop's caller, centralised training, the experiment harness), and
passed down as one `Runtime`. The maths never asks where it runs.

`precision` is the compute precision of the score network's forward and backward passes
(autocast); master weights, optimiser state, eq. 8's sums and counts and every metric stay
in float32/float64 whatever it says.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from typing import Any

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

    @property
    def vmap_of_grad_works(self) -> bool:
        """torch.func.vmap of grad fails under CPU autocast in torch 2.14 ("expected scalar
        type BFloat16 but found Float"): the engine's vmap strategy and DP-SGD's per-sample
        gradients both need fp32 on the CPU (any precision elsewhere)."""
        return self.precision == "fp32" or self.device.type != "cpu"

    def describe(self) -> dict:
        """What a run folder records of it."""
        return {"device": str(self.device), "precision": self.precision}

    def environment(self) -> dict:
        """What env.json records of it: `describe()` plus the device's name."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        elif self.device.type == "cpu":
            name = _cpu_name()
        else:
            name = self.device.type
        return self.describe() | {"device_name": name}


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FP32 = Runtime()
"""The default: what every job ran on before devices and precisions were chosen."""


def resolve(device: str | torch.device = "auto", precision: str = "auto") -> Runtime:
    """A Runtime for a device name ("auto", "cpu", "cuda", "cuda:N", "mps") and a precision
    ("auto", "fp32", "bf16", "fp16"); a device this machine lacks is a FedscoreError naming
    the ones it has.

    "auto" device: CUDA when present, else the CPU. "auto" precision: bf16 where the device
    has bf16 arithmetic (`bf16_supported`), else fp32."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FedscoreError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    have = available_devices()
    name = f"{dev.type}:{dev.index}" if dev.index is not None else dev.type
    if name not in have and dev.type not in have:
        raise FedscoreError(f"device {str(device)!r} is not available here; this machine has: "
                            f"{', '.join(have)}")
    if precision == "auto":
        precision = "bf16" if bf16_supported(dev) else "fp32"
    return Runtime(dev, precision)


def from_config(cfg: Any) -> Runtime:
    """The Runtime a run config asks for (its top-level `device` and `precision` keys):
    the one place a driver turns a config into a device and a precision."""
    return resolve(cfg.device, cfg.precision)


def pinned(cfg: Any, runtime: Runtime) -> Any:
    """`cfg` with `device` and `precision` replaced by what `runtime` resolved them to
    ("cpu", "fp32", not "auto"): what a run folder's config.yaml records."""
    return cfg.model_copy(update=runtime.describe())


def for_run(cfg: Any, device: str | None = None, precision: str | None = None) -> Runtime:
    """Where to use a finished run's model (sampling, evaluation, agents): `device`
    (default "auto": this machine's, not the one it trained on) and `precision` (default
    the run's own)."""
    return resolve(device or "auto", precision or cfg.precision)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively, where autocast to bf16 pays: CUDA from
    compute capability 8.0 (Ampere), a CPU with avx512_bf16 or AMX (oneDNN's own check).
    Elsewhere bf16 is emulated: on an AVX2-only CPU a tiny U-Net's training step measured
    10x slower in bf16 than in fp32 (BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def available_devices() -> list[str]:
    """The device names this machine can run on."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out
