"""Inception Score (Salimans et al. 2016) from classifier logits.

With p(y|x) = softmax(logits) and the marginal p(y) = mean over the split of p(y|x),

    IS = exp( E_x KL(p(y|x) || p(y)) ),

computed on each of `splits` chunks of the (shuffled) samples, and reported as the mean and
the (population, ddof=0) standard deviation over the chunks, as the original Improved-GAN
code and torch-fidelity do (torchmetrics reports ddof=1). A perfectly confident classifier
on a perfectly balanced set scores the number of classes; a constant prediction scores 1.

The papers feed Inception-v3 logits; here any classifier's logits fit (the domain
classifiers of `fedscore.metrics.features`, or Inception logits computed elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedscore.errors import FedscoreError


def inception_score(
    logits: Tensor,
    splits: int = 10,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks of logits (n, classes).

    Samples are shuffled before splitting (with `generator`, or a fresh generator seeded 0,
    so the default is reproducible): sample sets are often ordered by class (the FI paper
    generates digit by digit), and consecutive chunks of a class-sorted set score ~1 each.
    shuffle=False splits in the given order, as the original code does. splits=1 is
    order-free. Needs n >= splits."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise FedscoreError(
            f"logits must have shape (n, classes) with classes >= 2, got {tuple(logits.shape)}"
        )
    if not isinstance(splits, int) or splits < 1:
        raise FedscoreError(f"splits must be a positive integer, got {splits!r}")
    n = logits.shape[0]
    if n < splits:
        raise FedscoreError(f"the Inception Score needs at least splits={splits} samples, got {n}")
    if not torch.isfinite(logits).all():
        raise FedscoreError("logits contain NaN or infinite values")
    log_p = torch.log_softmax(logits.detach().to(torch.float64), dim=1)
    if shuffle:
        g = torch.Generator().manual_seed(0) if generator is None else generator
        log_p = log_p[torch.randperm(n, generator=g)]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]  # the original code's chunks
        # log p(y) = log mean_x p(y|x), via logsumexp for exactness with confident outputs
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(correction=0))
