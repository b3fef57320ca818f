"""Samplers recover a Gaussian from its exact score; a trained discriminator recovers the analytic ratio."""

import math

import pytest
import torch

from reweighting.diffusion import (
    EDM,
    PREDICTIONS,
    VE,
    TimeDependentDiscriminator,
    TimeDependentRatio,
    TimeMLP,
    VPCosine,
    VPLinear,
    balanced_bce,
    sample_ancestral,
    sample_ode,
    train_discriminator,
)

from .gaussian import ExactGaussianLogit, GaussianEps

MU, STD = torch.tensor([1.0, -2.0]), 0.5


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), VE(), EDM()], ids=lambda s: type(s).__name__)
def test_ode_sampler_recovers_a_gaussian(schedule, prediction):
    model = GaussianEps(MU, STD, schedule, prediction)
    x = sample_ode(model, (4000, 2), schedule, prediction=prediction, steps=40,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD), atol=0.04, rtol=0)


def test_euler_and_ancestral_samplers_recover_a_gaussian():
    schedule = VPLinear()
    model = GaussianEps(MU, STD, schedule)
    g = torch.Generator().manual_seed(0)
    for x in (sample_ode(model, (4000, 2), schedule, steps=100, method="euler", generator=g),
              sample_ancestral(model, (4000, 2), schedule, steps=200, generator=g)):
        torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), STD), atol=0.04, rtol=0)
    with pytest.raises(ValueError, match="method must be"):
        sample_ode(model, (4, 2), schedule, method="rk4")


def test_trained_discriminator_recovers_the_analytic_ratio():
    schedule = VPLinear()
    m = torch.tensor([1.5, 0.0])
    g = torch.Generator().manual_seed(0)
    reference, biased = torch.randn(500, 2, generator=g) + m, torch.randn(5000, 2, generator=g)
    torch.manual_seed(0)
    disc = TimeDependentDiscriminator(TimeMLP(2, 1, hidden=32, depth=2, squeeze=True))
    fit = train_discriminator(disc, reference, biased, schedule, steps=400, batch_size=256, lr=3e-3,
                              eval_every=50, patience=4, generator=g, show_progress=False)
    assert fit.best_holdout_loss < math.log(2) - 0.05
    assert not disc.training and fit.history[0][0] == 0 and fit.steps_run >= fit.best_step
    # early stopping waits for min_steps however flat the held-out loss is
    flat = TimeDependentDiscriminator(TimeMLP(2, 1, hidden=8, depth=1, squeeze=True))
    same = torch.randn(200, 2, generator=g)
    short = train_discriminator(flat, same[:100], same[100:], schedule, steps=200, eval_every=10, patience=1,
                                min_steps=120, generator=g, show_progress=False)
    assert short.steps_run >= 120
    exact = TimeDependentRatio(ExactGaussianLogit(m, schedule), clip=None)
    learned = TimeDependentRatio(disc)
    x = torch.randn(2000, 2, generator=g) * 1.2 + 0.5 * m
    for t_value in (0.05, 0.4):
        t = torch.full((2000,), t_value)
        a, b = learned.log_weight(x, t), exact.log_weight(x, t)
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9
    # at the held-out optimum, the held-out loss of the exact ratio is a lower bound up to noise
    t = schedule.sample_time(4000, generator=g)
    xr, _ = schedule.add_noise(torch.randn(4000, 2, generator=g) + m, t, generator=g)
    xb, _ = schedule.add_noise(torch.randn(4000, 2, generator=g), t, generator=g)
    best_possible = float(balanced_bce(exact.discriminator(xr, t), exact.discriminator(xb, t)))
    assert fit.best_holdout_loss > best_possible - 0.03


def test_discriminator_training_rejects_mismatched_sets():
    disc = TimeDependentDiscriminator(TimeMLP(2, 1, hidden=8, depth=1, squeeze=True))
    with pytest.raises(ValueError, match="reference samples have shape"):
        train_discriminator(disc, torch.randn(10, 3), torch.randn(10, 2), VPLinear(), show_progress=False)
    with pytest.raises(ValueError, match="reference needs at least 2 samples"):
        train_discriminator(disc, torch.randn(1, 2), torch.randn(10, 2), VPLinear(), show_progress=False)


def test_discriminator_ema_and_lr_decay_recover_the_analytic_input_gradient():
    # The EMA is what is evaluated and returned; with an annealed learning rate its input gradient
    # (the score correction) lines up with the exact one at low and high noise alike.
    schedule = VPLinear()
    m = torch.tensor([1.5, 0.0])
    g = torch.Generator().manual_seed(1)
    reference, biased = torch.randn(500, 2, generator=g) + m, torch.randn(5000, 2, generator=g)
    torch.manual_seed(1)
    disc = TimeDependentDiscriminator(TimeMLP(2, 1, hidden=32, depth=2, squeeze=True))
    fit = train_discriminator(disc, reference, biased, schedule, steps=400, batch_size=512, lr=3e-3, ema=0.99,
                              lr_decay=True, eval_every=50, patience=4, generator=g, show_progress=False)
    assert fit.best_holdout_loss < math.log(2) - 0.05 and not disc.training
    exact = TimeDependentRatio(ExactGaussianLogit(m, schedule), clip=None)
    learned = TimeDependentRatio(disc)
    x = torch.randn(2000, 2, generator=g) * 1.2 + 0.5 * m
    for t_value in (0.05, 0.6):
        t = torch.full((2000,), t_value)
        (_, ga), (_, gb) = learned.log_weight_and_grad(x, t), exact.log_weight_and_grad(x, t)
        cosine = float((ga * gb).sum() / (ga.norm() * gb.norm()))
        assert cosine > 0.85, (t_value, cosine)
    with pytest.raises(ValueError, match="ema must be"):
        train_discriminator(disc, reference, biased, schedule, steps=1, ema=1.0, show_progress=False)
