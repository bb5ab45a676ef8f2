"""The diffusion core (SPEC §1): the OU process, time grids, losses and samplers."""

from fedscore.diffusion.grids import GRIDS, kappa, step_sizes, time_grid
from fedscore.diffusion.losses import (
    PARAMETERISATIONS,
    WEIGHTINGS,
    draw_noise,
    dsm_loss,
    eq9_value,
    score_fn_of,
    to_eps,
    to_score,
)
from fedscore.diffusion.samplers import SAMPLERS, Observer, prior, sample
from fedscore.diffusion.score_model import ScoreModel
from fedscore.diffusion.sde import (
    clip_denoised,
    conditional_score,
    denoised,
    marginal,
    perturb,
    sigma,
)

__all__ = [
    "GRIDS",
    "Observer",
    "PARAMETERISATIONS",
    "SAMPLERS",
    "ScoreModel",
    "WEIGHTINGS",
    "clip_denoised",
    "conditional_score",
    "denoised",
    "draw_noise",
    "dsm_loss",
    "eq9_value",
    "kappa",
    "marginal",
    "perturb",
    "prior",
    "sample",
    "score_fn_of",
    "sigma",
    "step_sizes",
    "time_grid",
    "to_eps",
    "to_score",
]
