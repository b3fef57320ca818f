"""Schedules' alpha / sigma, the ratio from a logit (reference fraction, clipping), its input gradient."""

import math

import pytest
import torch

from reweighting.diffusion import (
    EDM,
    SCHEDULES,
    VE,
    TimeDependentRatio,
    VPCosine,
    VPLinear,
    log_ratio_from_logit,
    make_schedule,
)

from .gaussian import ExactGaussianLogit


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_monotone_and_sample_in_range(name):
    s = make_schedule(name)
    grid = s.time_grid(20)
    assert grid.shape == (21,)
    assert grid[0] == pytest.approx(s.t_max) and grid[-1] == pytest.approx(s.t_min)
    assert bool((grid[1:] < grid[:-1]).all())
    a, sig = s.alpha_sigma(grid)
    # noise falls and signal (weakly) rises as t goes down: the signal-to-noise ratio rises strictly
    snr = a / sig
    assert bool((snr[1:] > snr[:-1]).all())
    assert bool((sig > 0).all()) and bool((a > 0).all())
    t = s.sample_time(4000, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= s.t_min and float(t.max()) <= s.t_max


def test_variance_preserving_and_exploding_values():
    t = torch.linspace(0.01, 0.99, 50)
    for s in (VPLinear(), VPCosine()):
        a, sig = s.alpha_sigma(t)
        torch.testing.assert_close(a * a + sig * sig, torch.ones_like(t))
    vp = VPLinear()
    assert float(vp.alpha(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(vp.alpha(torch.tensor(1.0))) == pytest.approx(math.exp(-0.05 - 0.25 * 19.9), rel=1e-5)
    assert float(VPCosine().alpha(torch.tensor(0.0))) == pytest.approx(1.0)
    ve = VE(sigma_min=0.01, sigma_max=50.0)
    assert float(ve.sigma(torch.tensor(0.5))) == pytest.approx(math.sqrt(0.01 * 50.0), rel=1e-5)
    edm = EDM()
    torch.testing.assert_close(edm.sigma(torch.tensor([0.3, 2.0])), torch.tensor([0.3, 2.0]))
    log_sigma = torch.log(edm.sample_time(20000, generator=torch.Generator().manual_seed(0)))
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.05)
    with pytest.raises(ValueError, match="t_max must be < 1"):
        VPCosine(t_max=1.0)
    with pytest.raises(ValueError, match="t_min < t_max"):
        VPLinear(t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("linear")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        vp.time_grid(0)


def test_log_ratio_with_reference_fraction_matches_the_mixture_formula():
    logit = torch.linspace(-6, 6, 25)
    r = torch.exp(logit.double())
    for pi in (0.0, 0.05, 0.5, 0.9, 1.0):
        want = torch.log(r / (pi * r + 1 - pi)).float()
        torch.testing.assert_close(log_ratio_from_logit(logit, pi), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(log_ratio_from_logit(logit, 0.0, clip=2.0), logit.clamp(-2, 2))
    with pytest.raises(ValueError, match="reference_fraction must be in"):
        log_ratio_from_logit(logit, 1.5)
    with pytest.raises(ValueError, match="clip must be"):
        log_ratio_from_logit(logit, 0.0, clip=0.0)


def test_ratio_gradient_is_the_analytic_one_and_clipping_is_counted():
    schedule = VPLinear()
    m = torch.tensor([2.0, -1.0])
    ratio = TimeDependentRatio(ExactGaussianLogit(m, schedule), clip=None)
    x, t = torch.randn(64, 2), torch.full((64,), 0.4)
    log_w, grad = ratio.log_weight_and_grad(x, t)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(grad, (a / (a * a + s * s))[:, None] * m.expand(64, 2))
    torch.testing.assert_close(log_w, ratio.log_weight(x, t))
    assert log_w.shape == (64,) and log_w.dtype == torch.float32

    clipped = TimeDependentRatio(ExactGaussianLogit(m, schedule), clip=0.5)
    log_w, grad = clipped.log_weight_and_grad(x, t)
    outside = ratio.log_weight(x, t).abs() > 0.5
    assert bool(outside.any()) and bool((~outside).any())
    assert bool((grad[outside] == 0).all())  # the clipped weight is flat there
    assert clipped.clip_fraction() == pytest.approx(float(outside.float().mean()))
    state = clipped.state_dict()
    assert int(state["n_clipped"]) == int(outside.sum()) and int(state["n_evaluated"]) == 64


def test_ratio_rejects_bad_time_shapes():
    ratio = TimeDependentRatio(ExactGaussianLogit(torch.ones(2), VPLinear()))
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        ratio.log_weight(torch.randn(3, 2), torch.rand(2))
    with pytest.raises(ValueError, match="reference_fraction must be in"):
        TimeDependentRatio(ExactGaussianLogit(torch.ones(2), VPLinear()), reference_fraction=-0.1)
