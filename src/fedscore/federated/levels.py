"""Pruning levels of the paper's Appendix G (SPEC §2): a keep ratio per worker.

A level is a list of groups (percent of workers, keep ratio):
  F: 100% full;  L: 80% full, 20% keep 0.75;  M: 60% full, 20% keep 0.8, 20% keep 0.75;
  S: 60% full, 40% keep 0.75.

Rounding rule when N * percent / 100 is not an integer: largest-remainder (Hamilton)
apportionment. Every group first gets floor(N * p / 100) workers; the workers left over go
one each to the groups with the largest fractional remainders; equal remainders go to the
group listed first, i.e. full workers before pruned ones, lighter pruning before heavier.
Exact rational arithmetic (Fraction) makes the ties real ties, not float noise.
Example: M with N = 7 has quotas 4.2, 1.4, 1.4 -> 4, 1, 1 and one left over, which goes to
the 0.8 group (tied with 0.75, listed first): [1.0]*4 + [0.8]*2 + [0.75].
Workers are listed full first, then by decreasing keep ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from fedscore.errors import FedscoreError, unknown
from fedscore.federated.masks import check_keep_ratio

LEVELS: dict[str, tuple[tuple[int, float], ...]] = {
    "F": ((100, 1.0),),
    "L": ((80, 1.0), (20, 0.75)),
    "M": ((60, 1.0), (20, 0.8), (20, 0.75)),
    "S": ((60, 1.0), (40, 0.75)),
}


def apportion(percents: Sequence[int], n: int) -> list[int]:
    """Largest-remainder split of n workers over groups of the given percents (sum 100)."""
    quotas = [Fraction(p * n, 100) for p in percents]
    counts = [int(q) for q in quotas]  # floor: quotas are non-negative
    left = n - sum(counts)
    # sorted() is stable, so equal remainders keep the groups' listed order
    by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


def level_ratios(level: str | Sequence[float], n_workers: int | None = None) -> list[float]:
    """Keep ratio per worker: for a level name (F, L, M, S; default N = 10 workers), or an
    explicit list of ratios (checked to lie in (0, 1] and, if n_workers is given, to have
    one entry per worker)."""
    if not isinstance(level, str):
        ratios = [check_keep_ratio(r, f"keep ratio of worker {n}") for n, r in enumerate(level)]
        if not ratios:
            raise FedscoreError("keep ratios list is empty; give one keep ratio per worker")
        if n_workers is not None and len(ratios) != n_workers:
            raise FedscoreError(
                f"keep ratios list has {len(ratios)} entries for {n_workers} workers"
            )
        return ratios
    n = 10 if n_workers is None else int(n_workers)
    if n < 1:
        raise FedscoreError(f"n_workers must be at least 1, got {n_workers!r}")
    key = level.upper()
    if key not in LEVELS:
        raise unknown("pruning level", level, LEVELS)
    groups = LEVELS[key]
    counts = apportion([p for p, _ in groups], n)
    return [ratio for (_, ratio), c in zip(groups, counts) for _ in range(c)]
