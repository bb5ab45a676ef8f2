"""diffusion.clip_denoised against Tweedie's formula with exact Gaussian-mixture scores."""

import torch

from fedscore import diffusion, toy
from fedscore.diffusion.sde import mean_coef, sigma


def _setup():
    gm = toy.preset("ring8")  # means on a circle: some denoised points fall outside [-2, 2]
    g = torch.Generator().manual_seed(0)
    t = torch.full((512,), 0.3, dtype=torch.float64)
    x0 = gm.sample(512, generator=g).double()
    xt = diffusion.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    return gm, xt, t


def test_denoised_inverts_the_score_of_a_point_mass():
    # q_t for X_0 = c is N(alpha c, sigma^2): its score gives back c exactly
    c = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    score = -(x - mean_coef(t) * c) / sigma(t) ** 2
    assert torch.allclose(diffusion.denoised(x, score, t), c)


def test_wide_bounds_leave_the_score_unchanged():
    gm, xt, t = _setup()
    wide = diffusion.clip_denoised(gm.score, low=-100.0, high=100.0)
    assert torch.allclose(wide(xt, t), gm.score(xt, t), atol=1e-10)


def test_clipped_score_denoises_into_the_bounds_and_only_moves_out_of_range_points():
    gm, xt, t = _setup()
    clipped = diffusion.clip_denoised(gm.score, low=-2.0, high=2.0)
    x0_raw = diffusion.denoised(xt, gm.score(xt, t), t)
    x0_clip = diffusion.denoised(xt, clipped(xt, t), t)
    assert x0_clip.min() >= -2 - 1e-9 and x0_clip.max() <= 2 + 1e-9
    inside = (x0_raw.abs() <= 2).all(1)
    assert 0 < inside.sum() < len(inside)  # both cases occur on the ring
    assert torch.allclose(x0_clip[inside], x0_raw[inside], atol=1e-10)
    assert torch.allclose(x0_clip, x0_raw.clamp(-2, 2), atol=1e-10)


def test_stacked_scores_are_clipped_per_agent_and_no_attribute_is_carried():
    gm, xt, t = _setup()

    def stacked(x, tt):  # (K, B, D), like federated inference's agents
        return torch.stack([gm.score(x, tt), 2 * gm.score(x, tt)])

    stacked.n_agents = 2
    stacked.observe = lambda *args: None
    clipped = diffusion.clip_denoised(stacked)
    assert not hasattr(clipped, "n_agents") and not hasattr(clipped, "observe")
    out = clipped(xt, t)
    assert out.shape == (2, *xt.shape)
    single = diffusion.clip_denoised(gm.score)(xt, t)
    assert torch.allclose(out[0], single, atol=1e-10)


def test_a_clipped_mixture_tracks_its_weights_when_passed_as_the_observer():
    from fedscore import inference

    gm = toy.preset("two-clients")
    a, b = gm.components([0, 1]), gm.components([2, 3])
    times = diffusion.time_grid("exponential", 40, T=6.0, delta=1e-3)

    def run(wrap):
        mix = inference.combine([a.score, b.score], "mixture", weights=[0.6, 0.4])
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(200, 2, generator=g)
        x = diffusion.sample(wrap(mix), x_T, times, "exp-integrator", g, observer=mix)
        return x, mix.weights_now()

    x_plain, w_plain = run(lambda m: m)
    # bounds far outside the data: clipping is the identity, so nothing may change
    x_clip, w_clip = run(lambda m: diffusion.clip_denoised(m, low=-100.0, high=100.0))
    assert torch.allclose(x_clip, x_plain, atol=1e-4)
    assert torch.allclose(w_clip, w_plain, atol=1e-4)
    assert (w_plain.max(1).values > 0.99).float().mean() > 0.9  # the weights did move
