"""Gaussian mixtures: data with an exact score and density at every OU time (SPEC §1)."""

from fedscore.toy.gmm import PRESETS, GaussianMixture, preset

__all__ = ["GaussianMixture", "preset", "PRESETS"]
