"""What a domain classifier says about samples (FI paper, Table 1 and §4).

- `class_accuracy`: of class-conditional samples, the fraction the classifier assigns to
  the class they were generated for.
- `unrecognisable_fraction`: the fraction whose largest class probability is below a
  threshold (0.5 by default): samples the classifier cannot read as any digit, the FI
  paper's "noise" samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedscore.errors import FedscoreError


def _check_logits(logits: Tensor) -> Tensor:
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise FedscoreError(
            f"logits must have shape (n, classes) with n >= 1, classes >= 2; "
            f"got {tuple(logits.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise FedscoreError("logits contain NaN or infinite values")
    return logits.detach()


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of logits (n, classes) whose argmax equals labels (n,)."""
    logits = _check_logits(logits)
    labels = torch.as_tensor(labels)
    if labels.shape != (logits.shape[0],):
        raise FedscoreError(
            f"labels must have shape ({logits.shape[0]},) to match the logits, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise FedscoreError(f"labels must be integers in [0, {logits.shape[1] - 1}]")
    return float((logits.argmax(1) == labels).double().mean())


def unrecognisable_fraction(logits: Tensor, threshold: float = 0.5) -> float:
    """Fraction of rows of logits (n, classes) with max softmax probability < threshold."""
    logits = _check_logits(logits)
    if not 0.0 < threshold <= 1.0:
        raise FedscoreError(f"threshold must be in (0, 1], got {threshold}")
    top = torch.softmax(logits.to(torch.float64), dim=1).max(1).values
    return float((top < threshold).double().mean())
