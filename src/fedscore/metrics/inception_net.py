"""Inception-v3 features and logits from a LOCAL weights file (the papers' FID/IS network).

FID and IS in the papers use the 2015-12-05 TensorFlow Inception-v3 graph. pytorch-fid and
torch-fidelity ship it ported to PyTorch as `pt_inception-2015-12-05-6726825d.pth` (the same
file, torch-fidelity names it `weights-inception-2015-12-05-6726825d.pth`): a state dict in
torchvision's `Inception3` layout (Conv2d_1a_3x3 ... Mixed_7c, fc) with 1008 classes and no
auxiliary head. Nothing is downloaded here: the user passes the file's path, and
`load_inception` reads it (a `torch.load(weights_only=True)` state dict or a safetensors file).

The TF graph differs from torchvision's blocks in one place, the pooling branch
(`tf_compatible=True`, as pytorch-fid does):
- Mixed_5b-5d, 6b-6e, 7b: 3x3 average pooling EXCLUDING the zero padding from the count;
- Mixed_7c: 3x3 max pooling instead of average pooling.
Features are the 2048-d global average pool after Mixed_7c ("pool3"), logits are fc(pool3).

Input: images (n, C, H, W) in [-1, 1], C = 1 (grey, repeated to 3 channels) or 3, resized
bilinearly to 299 x 299 — the TF network's input range is [-1, 1] already. pytorch-fid
resizes the same way; torch-fidelity resizes uint8 images with its own TF-style bilinear
kernel, so numbers agree with pytorch-fid's closely and with torch-fidelity's to within the
resize's effect.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedscore.errors import FedscoreError
from fedscore.metrics.stats import FeatureStats

INPUT_SIZE = 299
FEATURES = 2048
EXPECTED_FORMAT = (
    "a state dict of torchvision's Inception3 layout (keys such as "
    "'Conv2d_1a_3x3.conv.weight', 'Mixed_7c.branch_pool.bn.running_var', 'fc.weight'), "
    "saved with torch.save or as safetensors — e.g. pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth is the same file). TorchScript archives "
    "(inception-2015-12-05.pt) and pickled whole models are not accepted"
)


def _tf_pool_blocks():
    """torchvision Inception blocks whose pooling branch follows the TF graph."""
    # torchvision is imported on use: it takes seconds, and only FID/IS with Inception need it
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def exclude_pad(cls):
        class Block(cls):
            # torchvision averages with the zero padding counted; TF divides by the number
            # of real pixels under the window. Recompute the pooling branch that way.
            def _forward(self, x: Tensor) -> list[Tensor]:
                outs = super()._forward(x)
                pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                                      count_include_pad=False)
                outs[-1] = self.branch_pool(pooled)
                return outs

        Block.__name__ = f"TF{cls.__name__}"
        return Block

    class TFInceptionEMax(InceptionE):
        # the TF graph's last block (Mixed_7c) max-pools in its pooling branch
        def _forward(self, x: Tensor) -> list[Tensor]:
            outs = super()._forward(x)
            outs[-1] = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
            return outs

    return exclude_pad(InceptionA), exclude_pad(InceptionC), exclude_pad(InceptionE), (
        TFInceptionEMax
    )


def build_inception(num_classes: int = 1008, *, tf_compatible: bool = True) -> nn.Module:
    """torchvision's Inception3 without weights (no auxiliary head, no input transform);
    with tf_compatible, the pooling branches of the TF graph (module docstring)."""
    from torchvision.models import inception as tv

    kwargs = {}
    if tf_compatible:
        a, c, e, e_max = _tf_pool_blocks()
        kwargs["inception_blocks"] = [
            tv.BasicConv2d, a, tv.InceptionB, c, tv.InceptionD, e, tv.InceptionAux
        ]
    net = tv.Inception3(num_classes=num_classes, aux_logits=False, transform_input=False,
                        init_weights=False, **kwargs)
    if tf_compatible:
        net.Mixed_7c.__class__ = e_max  # same parameters as InceptionE, other pooling
    return net.eval()


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a local weights file: safetensors, or a torch.save'd state dict read with
    weights_only=True (no code is executed). A missing or unreadable file is a FedscoreError."""
    path = Path(path)
    if not path.is_file():
        raise FedscoreError(
            f"Inception weights file {str(path)!r} does not exist. Nothing is downloaded: "
            f"pass --inception-weights with the path of a local copy of {EXPECTED_FORMAT}"
        )
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise FedscoreError(f"cannot read {str(path)!r} as safetensors: {err}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip or weights_only errors
            raise FedscoreError(
                f"cannot read {str(path)!r} as a weights-only torch state dict "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                f"Expected {EXPECTED_FORMAT}"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint around the state dict
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FedscoreError(f"{str(path)!r} does not hold a state dict; expected {EXPECTED_FORMAT}")
    return {k.removeprefix("module."): v for k, v in state.items()}


class InceptionNet:
    """Inception-v3 read-outs: `features` (n, 2048) pool3, `logits` (n, classes), `stats`
    (mergeable FeatureStats of pool3), for images (n, C, H, W) in [-1, 1]."""

    def __init__(self, net: nn.Module, *, device: str | torch.device = "cpu",
                 path: Path | None = None):
        self.fc = net.fc
        net.fc = nn.Identity()  # the trunk then returns pool3 (dropout is off in eval)
        self.net = net.eval().to(device)
        self.fc = self.fc.eval().to(device)
        self.device = torch.device(device)
        self.path = path

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def num_features(self) -> int:
        return self.fc.in_features

    def _prepare(self, images: Tensor) -> Tensor:
        """(n, C, H, W) in [-1, 1] -> (n, 3, 299, 299) float on the device."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as an image viewer would
        if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        return x

    @torch.no_grad()
    def features_and_logits(
        self, images: Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(pool3 (n, 2048), logits (n, classes)) on the CPU, float64 features, in one pass."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise FedscoreError(
                f"images for Inception must have shape (n >= 1, 1 or 3, H, W), got "
                f"{tuple(images.shape)}"
            )
        if not torch.isfinite(images).all():
            raise FedscoreError("images contain NaN or infinite values")
        feats, logits = [], []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="inception", disable=not progress, leave=False):
            f = self.net(self._prepare(images[start : start + batch_size]))
            feats.append(f.double().cpu())
            logits.append(self.fc(f).double().cpu())
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: Tensor, batch_size: int = 64, progress: bool = False) -> Tensor:
        """pool3 features (n, 2048)."""
        return self.features_and_logits(images, batch_size, progress)[0]

    def logits(self, images: Tensor, batch_size: int = 64, progress: bool = False) -> Tensor:
        """Class logits (n, 1008 or 1000)."""
        return self.features_and_logits(images, batch_size, progress)[1]

    def stats(self, images: Tensor, batch_size: int = 64, progress: bool = False) -> FeatureStats:
        """Mergeable pool3 statistics (n, sum f, sum f f^T): what a silo shares."""
        return FeatureStats.from_features(self.features(images, batch_size, progress))

    def __repr__(self) -> str:
        return f"InceptionNet(classes={self.num_classes}, weights={str(self.path)!r})"


def load_inception(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    tf_compatible: bool = True,
) -> InceptionNet:
    """Inception-v3 with the weights of a local file (module docstring for the format).
    device: None picks CUDA when available. Keys that do not fit torchvision's layout are a
    FedscoreError naming the expected format; an auxiliary head in the file is ignored."""
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != FEATURES:
        raise FedscoreError(
            f"{str(path)!r} has no 'fc.weight' of shape (classes, {FEATURES}) "
            f"(got {None if fc is None else tuple(fc.shape)}); expected {EXPECTED_FORMAT}"
        )
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    net = build_inception(int(fc.shape[0]), tf_compatible=tf_compatible)
    expected = net.state_dict()
    # old ports carry no BatchNorm step counters; they do not affect evaluation
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        details = "; ".join(
            f"{what}: {few(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("wrong shape", wrong))
            if keys
        )
        raise FedscoreError(
            f"{str(path)!r} does not fit torchvision's Inception3 ({details}); expected "
            f"{EXPECTED_FORMAT}"
        )
    net.load_state_dict(state, strict=False)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return InceptionNet(net, device=device, path=Path(path))
