"""Mask policies of SPEC §2: which coordinates worker n keeps in round q (eq. 7's m_{q,n}).

Keep ratios are applied PER TENSOR with an exact count

    k = min(numel, max(1, floor(keep_ratio * numel + 1/2)))      (round half up, at least 1)

so the model-wide kept fraction equals keep_ratio up to this rounding, whatever the layer
sizes. At least one coordinate of every tensor is kept: a tensor pruned to nothing would be
an all-zero layer for that worker (a dead bias or a zero weight matrix), which no published
variant of the algorithm intends. keep_ratio = 1 gives an all-True mask under every policy
without touching the generator.

A policy is a plain callable `(tensor, keep_ratio, generator) -> bool tensor of the same
shape` in the dict POLICIES; `make_mask` resolves the name. Masks of a model are built
tensor by tensor in sorted name order, so a party that knows the seed, the policy, the
names and the shapes (a Flower server) regenerates a random mask exactly, whatever the
order of its dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown

Policy = Callable[[Tensor, float, "torch.Generator | None"], Tensor]
Exclude = Callable[[str], bool] | Collection[str] | None


def kept_count(numel: int, keep_ratio: float) -> int:
    """k = round-half-up(keep_ratio * numel), clipped to [1, numel] (the module's rule)."""
    return min(numel, max(1, math.floor(keep_ratio * numel + 0.5)))


def full_mask(theta: Tensor, keep_ratio: float, generator: torch.Generator | None) -> Tensor:
    """Keep everything (FedAvg's worker); keep_ratio is ignored."""
    return torch.ones_like(theta, dtype=torch.bool)


def random_mask(theta: Tensor, keep_ratio: float, generator: torch.Generator | None) -> Tensor:
    """A uniformly random subset of exactly k coordinates (fresh for every generator state)."""
    k = kept_count(theta.numel(), keep_ratio)
    if k == theta.numel():
        return full_mask(theta, keep_ratio, generator)
    if generator is None:
        # A hidden global RNG would make masks irreproducible and impossible for a server
        # to regenerate from a seed.
        raise FedscoreError("mask policy 'random' needs a torch.Generator (generator=...)")
    keep = torch.randperm(theta.numel(), generator=generator, device=generator.device)[:k]
    flat = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
    flat[keep.to(theta.device)] = True
    return flat.reshape(theta.shape)


def topk_mask(theta: Tensor, keep_ratio: float, generator: torch.Generator | None) -> Tensor:
    """The k coordinates of largest |theta|; ties go to the lower flat index (a stable sort),
    so the mask is a deterministic function of theta."""
    k = kept_count(theta.numel(), keep_ratio)
    if k == theta.numel():
        return full_mask(theta, keep_ratio, generator)
    order = torch.sort(theta.detach().abs().reshape(-1), descending=True, stable=True).indices
    flat = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
    flat[order[:k]] = True
    return flat.reshape(theta.shape)


POLICIES: dict[str, Policy] = {"full": full_mask, "random": random_mask, "topk": topk_mask}


def resolve_policy(policy: str | Policy) -> Policy:
    """A policy callable from its name (or the callable itself, for custom policies)."""
    if callable(policy):
        return policy
    if policy not in POLICIES:
        raise unknown("mask policy", policy, POLICIES)
    return POLICIES[policy]


def check_keep_ratio(keep_ratio: float, field: str = "keep_ratio") -> float:
    ratio = float(keep_ratio)
    if not 0.0 < ratio <= 1.0:
        raise FedscoreError(f"{field} must be in (0, 1], got {keep_ratio!r}")
    return ratio


def _excluded(exclude: Exclude) -> Callable[[str], bool]:
    if exclude is None:
        return lambda name: False
    if callable(exclude):
        return exclude
    names = set(exclude)
    return lambda name: name in names


def make_mask(
    params: dict[str, Tensor],
    policy: str | Policy = "topk",
    keep_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    *,
    exclude: Exclude = None,
) -> dict[str, Tensor]:
    """m_{q,n} of eq. 7 for one worker: a bool tensor per parameter tensor, same shapes.

    `exclude` (a predicate on the tensor name, or a collection of names) marks tensors that
    are never pruned, e.g. norms and biases; by default every tensor is pruned, as in the
    paper, where the mask ranges over all D coordinates.
    """
    ratio = check_keep_ratio(keep_ratio)
    fn = resolve_policy(policy)
    skip = _excluded(exclude)
    masks = {}
    # sorted names: the generator is consumed in an order that does not depend on how the
    # dict was built (a checkpoint may hand tensors back sorted, a model in module order)
    for name in sorted(params):
        theta = params[name]
        if skip(name):
            masks[name] = torch.ones_like(theta, dtype=torch.bool)
            continue
        mask = fn(theta, ratio, generator)
        if mask.shape != theta.shape or mask.dtype != torch.bool:
            raise FedscoreError(
                f"mask policy {policy!r} returned a {mask.dtype} mask of shape "
                f"{tuple(mask.shape)} for {name!r}; it must be bool of shape {tuple(theta.shape)}"
            )
        masks[name] = mask
    return {name: masks[name] for name in params}


def build_masks(
    global_params: dict[str, Tensor],
    policy: str | Policy,
    keep_ratios: Sequence[float],
    generators: Sequence[torch.Generator | None] | None,
    *,
    exclude: Exclude = None,
) -> dict[str, Tensor]:
    """Every worker's mask for one round, stacked: name -> bool (N, *shape).

    Worker n uses keep_ratios[n] and its own generators[n] (the caller seeds it from
    (run seed, round, worker), so runs are reproducible and a Flower client or server can
    regenerate the same mask). `generators` may be None for deterministic policies.
    """
    n_workers = len(keep_ratios)
    if n_workers == 0:
        raise FedscoreError("keep_ratios is empty; give one keep ratio per worker")
    if generators is None:
        generators = [None] * n_workers
    if len(generators) != n_workers:
        raise FedscoreError(
            f"generators has {len(generators)} entries for {n_workers} keep ratios; "
            "give one torch.Generator per worker"
        )
    per_worker = [
        make_mask(global_params, policy, r, g, exclude=exclude)
        for r, g in zip(keep_ratios, generators)
    ]
    return {name: torch.stack([m[name] for m in per_worker]) for name in global_params}
