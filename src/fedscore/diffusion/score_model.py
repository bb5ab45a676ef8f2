"""A score network read as a score function: the one wrapper between models and samplers.

A network maps (x, t, y) to a raw output of x's shape; its parameterisation says what that
output is (SPEC §1): the score itself ("score") or the noise ("eps", s = -eps / sigma_t).
`ScoreModel` binds the network, its parameterisation, optionally the labels of a
class-conditional batch, and optionally a dict of parameters that replaces the module's
own through torch.func.functional_call (no copy of the module; works under vmap and
grad, as the federated engine and the stacked agents need).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from torch import Tensor, nn
from torch.func import functional_call

from fedscore.diffusion.losses import PARAMETERISATIONS, to_score
from fedscore.errors import unknown

Net = Callable[..., Tensor]  # net(x, t, y) -> out, out.shape == x.shape


@dataclass(frozen=True, eq=False)
class ScoreModel:
    """(x, t) -> s_theta(x, t) of a network.

    net:              called as net(x, t, y); an nn.Module when `params` is given.
    parameterisation: "eps" (s = -out / sigma_t, DDPM's) or "score" (s = out).
    labels:           (B,) class labels bound to the batch (None: unconditional, or the
                      network's null label).
    params:           name -> tensor evaluated in place of the module's own parameters.

    x: (B, ...), t: (B,) forward times -> (B, ...). `net_fn` is the raw output (x, t) -> out
    that `dsm_loss` takes; `with_labels` and `with_params` rebind without copying.
    """

    net: Net | nn.Module
    parameterisation: str = "eps"
    labels: Tensor | None = None
    params: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.parameterisation not in PARAMETERISATIONS:
            raise unknown("parameterisation", self.parameterisation, PARAMETERISATIONS)

    def net_fn(self, x: Tensor, t: Tensor) -> Tensor:
        """The network's raw output (eps or score) at (x, t) with the bound labels."""
        if self.params is None:
            return self.net(x, t, self.labels)
        return functional_call(self.net, dict(self.params), (x, t, self.labels))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return to_score(self.net_fn(x, t), t, self.parameterisation)

    def with_labels(self, labels: Tensor | None) -> ScoreModel:
        return replace(self, labels=labels)

    def with_params(self, params: Mapping[str, Tensor] | None) -> ScoreModel:
        return replace(self, params=params)
