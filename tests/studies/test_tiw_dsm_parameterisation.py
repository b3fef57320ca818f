"""The ``tiw-dsm`` study's score model: EDM-preconditioned denoiser, its loss weight and the TIW-DSM target in x0 units.

Checked against things outside the code under test: the exact denoiser of Gaussian data, and the
eps-parameterised TIW-DSM loss of the same network (the two losses must agree sample by sample up
to the factor ``(sigma / alpha)^2`` that converts an eps error into an x0 error).
"""

import math

import pytest
import torch

from reweighting.diffusion import TimeDependentRatio, TimeMLP, VPCosine, dsm_loss, tiw_dsm_loss
from reweighting.studies import tiw_dsm as S


class Zero(torch.nn.Module):
    """``F = 0`` (with a parameter, so that the losses' dtype / device checks have one to read)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, u, c):
        return 0.0 * self.p + torch.zeros_like(u)


def test_preconditioned_denoiser_with_zero_network_is_the_exact_denoiser_of_gaussian_data():
    # x_0 ~ N(0, sd^2 I), x_t = alpha x_0 + sigma eps: E[x_0 | x_t] = alpha sd^2 x_t / (alpha^2 sd^2 + sigma^2),
    # which is c_skip y with y = x_t / alpha: the network only has to learn what Gaussian data do not explain
    schedule, sd = VPCosine(), 0.7
    model = S.Preconditioned(Zero(), schedule, sd)
    t = torch.tensor([1e-3, 0.05, 0.3, 0.7, 0.99])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    alpha, sigma = schedule.alpha_sigma(t)
    want = (alpha * sd**2 / (alpha**2 * sd**2 + sigma**2))[:, None] * x
    torch.testing.assert_close(model(x, t), want, rtol=1e-5, atol=1e-6)
    # EDM's weight 1 / c_out^2 with s = sigma / alpha
    s = sigma / alpha
    torch.testing.assert_close(model.loss_weight(t), (s**2 + sd**2) / (s * sd) ** 2)


def test_network_sees_unit_variance_input_and_log_noise_level():
    seen = {}

    class Spy(Zero):
        def forward(self, u, c):
            seen["u"], seen["c"] = u, c
            return super().forward(u, c)

    schedule, sd = VPCosine(), 0.8
    model = S.Preconditioned(Spy(), schedule, sd)
    g = torch.Generator().manual_seed(1)
    x0 = sd * torch.randn(20_000, 2, generator=g)
    t = torch.full((20_000,), 0.6)
    x_t, _ = schedule.add_noise(x0, t, generator=g)
    model(x_t, t)
    alpha, sigma = schedule.alpha_sigma(t[:1])
    assert abs(float(seen["u"].std()) - 1.0) < 0.02
    torch.testing.assert_close(seen["c"][:1], torch.log(sigma / alpha) / 4)


class GaussianLogit(torch.nn.Module):
    """Exact ``log p_data^t / p_bias^t`` for p_bias = N(0, I), p_data = N(m, I) under a VP schedule."""

    def __init__(self, schedule, m):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("m", m)

    def forward(self, x, t):
        alpha, _ = self.schedule.alpha_sigma(t)
        am = alpha[:, None] * self.m
        return (x * am).sum(1) - 0.5 * am.pow(2).sum(1)


class EpsOf(torch.nn.Module):
    """The eps prediction implied by a denoiser: ``eps = (x - alpha D) / sigma``."""

    def __init__(self, denoiser, schedule):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule

    def forward(self, x, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        return (x - alpha[:, None] * self.denoiser(x, t)) / sigma[:, None]


@pytest.mark.parametrize(("reweight", "correct"), [(True, True), (False, True), (True, False)])
def test_x0_tiw_dsm_loss_equals_the_eps_loss_of_the_same_network(reweight, correct):
    # |D - (x0 + sigma^2/alpha g)|^2 = (sigma/alpha)^2 |eps_hat - (eps - sigma g)|^2 for eps_hat = (x - alpha D)/sigma:
    # the study's x0 loss (EDM-weighted) and the paper's eps loss train the same thing, sample by sample
    schedule = VPCosine()
    torch.manual_seed(0)
    denoiser = S.Preconditioned(TimeMLP(2, hidden=16, depth=2), schedule, 0.8)
    ratio = TimeDependentRatio(GaussianLogit(schedule, torch.tensor([1.5, -0.5])), reference_fraction=0.1, clip=None)
    g = torch.Generator().manual_seed(2)
    n = 64
    x0 = torch.randn(n, 2, generator=g)
    t = S.LogNormalTimes(schedule, -1.0, 1.5).sample_time(n, generator=g)
    noise = torch.randn(n, 2, generator=g)

    def to_eps_units(tt):
        alpha, sigma = schedule.alpha_sigma(tt)
        return (alpha / sigma) ** 2

    loss_x0, per_x0 = tiw_dsm_loss(denoiser, x0, schedule, ratio, prediction="x0", reweight=reweight, correct=correct,
                                   t=t, noise=noise, loss_weight=to_eps_units)
    loss_eps, per_eps = tiw_dsm_loss(EpsOf(denoiser, schedule), x0, schedule, ratio, prediction="eps",
                                     reweight=reweight, correct=correct, t=t, noise=noise)
    torch.testing.assert_close(per_x0, per_eps, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(loss_x0, loss_eps, rtol=2e-4, atol=1e-6)
    # and the correction does move the target: without it the losses differ
    if correct:
        _, plain = tiw_dsm_loss(denoiser, x0, schedule, ratio, prediction="x0", reweight=reweight, correct=False,
                                t=t, noise=noise, loss_weight=to_eps_units)
        assert float((plain - per_x0).detach().abs().max()) > 1e-2


def test_corrected_x0_target_is_minimised_by_the_data_denoiser():
    # Gaussian case: biased N(0, I), data N(m, I). The correction-only x0 loss on biased samples must be
    # smallest at the *data* denoiser E_data[x0 | x_t] = m + (alpha (x_t - alpha m)) (variance 1), and the loss of
    # any other denoiser exceeds it by exactly E|shift|^2 (no cross term) in expectation.
    schedule = VPCosine()
    m = torch.tensor([1.0, -0.5])
    ratio = TimeDependentRatio(GaussianLogit(schedule, m), clip=None)

    class Denoiser(torch.nn.Module):
        def __init__(self, mean, shift=0.0):
            super().__init__()
            self.register_buffer("mean", mean)
            self.shift = shift
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            alpha, _ = schedule.alpha_sigma(t)
            return self.mean + alpha[:, None] * (x - alpha[:, None] * self.mean) + self.shift + 0.0 * self.p

    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.randn(n, 2, generator=g)
    t = torch.full((n,), 0.45)
    noise = torch.randn(n, 2, generator=g)

    def loss(model):
        value, _ = tiw_dsm_loss(model, x0, schedule, ratio, prediction="x0", reweight=False, t=t, noise=noise)
        return float(value.detach())

    data, bias = loss(Denoiser(m)), loss(Denoiser(torch.zeros(2)))
    shifted = loss(Denoiser(m, 0.1))
    assert data < bias
    assert shifted - data == pytest.approx(0.1**2, rel=0.05)  # mean over the 2 dims of a 0.1 shift squared
    # the plain DSM loss is smallest at the biased denoiser instead
    plain = {k: float(dsm_loss(d, x0, schedule, prediction="x0", t=t, noise=noise)[0].detach())
             for k, d in (("data", Denoiser(m)), ("bias", Denoiser(torch.zeros(2))))}
    assert plain["bias"] < plain["data"]


def test_log_normal_times_follow_the_log_noise_ratio_law():
    schedule = S.LogNormalTimes(VPCosine(), -1.0, 1.2)  # the ends are more than 3.3 standard deviations out
    t = schedule.sample_time(40_000, generator=torch.Generator().manual_seed(0))
    alpha, sigma = schedule.alpha_sigma(t)
    lam = torch.log(sigma / alpha).double()
    lo, hi = schedule.log_ratio_ends.tolist()
    inside = (lam > lo + 1e-3) & (lam < hi - 1e-3)  # the clamped ends hold only the far tail
    assert float(inside.double().mean()) > 0.99
    assert abs(float(lam.mean()) + 1.0) < 0.03 and abs(float(lam.std()) - 1.2) < 0.03
    assert schedule.t_min == VPCosine().t_min and torch.equal(schedule.time_grid(5), VPCosine().time_grid(5))
    with pytest.raises(ValueError, match="p_std"):
        S.LogNormalTimes(VPCosine(), 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        S.Preconditioned(Zero(), VPCosine(), -1.0)


def test_every_method_gets_the_same_score_model_and_bad_settings_are_named():
    cfg = S.SMOKE
    schedule = S.make_study_schedule(cfg)
    torch.manual_seed(0)
    a = S.make_score_model(cfg, 2, schedule, seed=1)
    torch.manual_seed(0)
    b = S.make_score_model(cfg, 2, schedule, seed=1)
    assert isinstance(a, S.Preconditioned) and isinstance(a.net, S.FourierMLP)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert isinstance(S.make_score_model(cfg, 64, schedule, seed=1).net, TimeMLP)  # digits: no Fourier features
    import dataclasses

    with pytest.raises(ValueError, match="prediction must be one of"):
        S.make_study_schedule(dataclasses.replace(cfg, prediction="v"))
    with pytest.raises(ValueError, match="time_sampler must be one of"):
        S.make_study_schedule(dataclasses.replace(cfg, time_sampler="uniform"))
    assert math.isclose(S.HEALTHY_ON_RING, 0.9)
