"""DSM / IW-DSM / TIW-DSM: the correction's sign and scale in every parameterisation, shapes, ablations."""

import math

import pytest
import torch

from reweighting.diffusion import (
    EDM,
    PREDICTIONS,
    VE,
    TimeDependentRatio,
    TimeMLP,
    VPCosine,
    VPLinear,
    dsm_loss,
    iw_dsm_loss,
    sample_ode,
    tiw_dsm_loss,
)

from .gaussian import ExactGaussianLogit, data_score, target_from_score

M = torch.tensor([1.5, -1.0])


class Probe(torch.nn.Module):
    """A model that predicts zeros and remembers its input, so the loss's target can be read from the gradient."""

    def forward(self, x_t, t):
        self.x_t = x_t.detach()
        self.out = torch.zeros_like(x_t, requires_grad=True)
        return self.out


def targets_through_loss(prediction, schedule, ratio, t_value, n, correct=True, seed=0):
    """(x_t, target) as the loss sees them: l_i = mean_d (0 - target)^2, so target = -(D / 2) dl_i/dpred."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g)  # the biased stream, N(0, I)
    probe = Probe()
    t = torch.full((n,), t_value)
    _, per_sample = tiw_dsm_loss(probe, x0, schedule, ratio, prediction=prediction, reweight=False, correct=correct,
                                 t=t, generator=g)
    (grad,) = torch.autograd.grad(per_sample.sum(), probe.out)
    return probe.x_t, -grad * x0.shape[1] / 2


def conditional_mean_fit(x, y):
    """Least-squares affine fit of y on x: for jointly Gaussian (x, y) this is E[y | x]."""
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    coef = torch.linalg.lstsq(design, y.double()).solution
    return lambda q: (torch.cat([q, torch.ones(q.shape[0], 1)], dim=1).double() @ coef).float()


CASES = [(VPLinear(), 0.3), (VPLinear(), 0.7), (VPCosine(), 0.5), (VE(), 0.55), (EDM(), 0.8)]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule,t_value", CASES, ids=lambda c: str(c) if isinstance(c, float) else type(c).__name__)
def test_corrected_target_has_the_data_score_target_as_conditional_mean(prediction, schedule, t_value):
    ratio = TimeDependentRatio(ExactGaussianLogit(M, schedule), clip=None)
    x_t, target = targets_through_loss(prediction, schedule, ratio, t_value, 200_000)
    fit = conditional_mean_fit(x_t, target)
    a, s = schedule.alpha_sigma(torch.tensor([t_value]))
    spread = math.sqrt(float(a * a + s * s))
    probes = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]]) * spread + a * M
    t = torch.full((probes.shape[0],), t_value)
    want = target_from_score(prediction, probes, t, data_score(probes, t, M, schedule), schedule)
    # The uncorrected target's conditional mean is the biased one: the correction must close that gap.
    _, biased_target = targets_through_loss(prediction, schedule, ratio, t_value, 200_000, correct=False)
    biased = conditional_mean_fit(x_t, biased_target)(probes)
    gap = (want - biased).abs().max()
    assert gap > 0.05, "the case must be able to tell a corrected target from an uncorrected one"
    torch.testing.assert_close(fit(probes), want, atol=0.03 * float(gap) + 0.01, rtol=0.0)


def test_wrong_sign_of_correction_would_fail_the_analytic_check():
    # eps-prediction: the corrected target is eps - sigma g; eps + sigma g is what a sign error gives.
    schedule, t_value = VPLinear(), 0.5
    ratio = TimeDependentRatio(ExactGaussianLogit(M, schedule), clip=None)
    x_t, target = targets_through_loss("eps", schedule, ratio, t_value, 50_000)
    a, s = schedule.alpha_sigma(torch.tensor([t_value]))
    g = a * M / (a * a + s * s)
    _, plain = targets_through_loss("eps", schedule, ratio, t_value, 50_000, correct=False)
    torch.testing.assert_close(target, plain - s * g)


def _train(loss_fn, steps=500, seed=0, prediction="eps"):
    torch.manual_seed(seed)
    model = TimeMLP(2, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = torch.randn(256, 2, generator=g)  # biased data: N(0, I)
        loss, _ = loss_fn(model, x0, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = sample_ode(model, (3000, 2), VPLinear(), prediction=prediction, steps=30,
                         generator=torch.Generator().manual_seed(1))
    return samples.mean(0)


def test_short_training_moves_the_mean_towards_the_reference_mean():
    schedule = VPLinear()
    ratio = TimeDependentRatio(ExactGaussianLogit(M, schedule), clip=None)
    plain = _train(lambda m, x0, p: dsm_loss(m, x0, schedule, prediction=p))
    tiw = _train(lambda m, x0, p: tiw_dsm_loss(m, x0, schedule, ratio, prediction=p))
    corrected_x0 = _train(lambda m, x0, p: tiw_dsm_loss(m, x0, schedule, ratio, prediction=p, reweight=False),
                          prediction="x0")
    assert (plain - 0).norm() < 0.3, plain
    assert (tiw - M).norm() < 0.4 * M.norm(), tiw
    assert (corrected_x0 - M).norm() < 0.4 * M.norm(), corrected_x0


class ConstantLogit(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return torch.full((x.shape[0],), self.c) + 0 * x.reshape(x.shape[0], -1).sum(1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_constant_ratio_makes_tiw_dsm_equal_dsm(prediction):
    schedule = VPCosine()
    torch.manual_seed(0)
    model = TimeMLP(3, hidden=16, depth=1)
    x0, t, noise = torch.randn(12, 3), schedule.sample_time(12), torch.randn(12, 3)
    want, want_per = dsm_loss(model, x0, schedule, prediction=prediction, t=t, noise=noise)
    got, got_per = tiw_dsm_loss(model, x0, schedule, TimeDependentRatio(ConstantLogit(0.0)), prediction=prediction,
                                t=t, noise=noise)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_per, want_per)
    # a constant weight e^c: a plain scale, or nothing at all once self-normalised
    scaled, _ = tiw_dsm_loss(model, x0, schedule, TimeDependentRatio(ConstantLogit(0.7)), prediction=prediction,
                             t=t, noise=noise)
    normalised, _ = tiw_dsm_loss(model, x0, schedule, TimeDependentRatio(ConstantLogit(0.7)),
                                 prediction=prediction, t=t, noise=noise, self_normalize=True)
    torch.testing.assert_close(scaled, math.exp(0.7) * want)
    torch.testing.assert_close(normalised, want)


class PerSampleLogit(torch.nn.Module):
    """Logit depends on each sample's own values only: distinct weights per sample."""

    def forward(self, x, t):
        return 0.3 * x.reshape(x.shape[0], -1).mean(1) * (1 + t)


def test_weights_and_per_sample_losses_have_shape_batch_on_images():
    schedule = VPLinear()
    b = 5
    x0, t, noise = torch.randn(b, 3, 4, 4), schedule.sample_time(b), torch.randn(b, 3, 4, 4)
    model = lambda x, tt: 0.5 * x  # noqa: E731  (a fixed "model" shaped like its input)
    ratio = TimeDependentRatio(PerSampleLogit())
    loss, per_sample = tiw_dsm_loss(model, x0, schedule, ratio, prediction="x0", t=t, noise=noise)
    assert per_sample.shape == (b,)
    # each sample on its own: weight_i * mean over its pixels of (pred_i - corrected target_i)^2
    manual = []
    for i in range(b):
        xi, ti, ni = x0[i : i + 1], t[i : i + 1], noise[i : i + 1]
        _, alone = tiw_dsm_loss(model, xi, schedule, ratio, prediction="x0", t=ti, noise=ni)
        manual.append(alone[0])
    manual = torch.stack(manual)
    torch.testing.assert_close(per_sample, manual)
    torch.testing.assert_close(loss, manual.mean())
    w = ratio.weight(*schedule.add_noise(x0, t, noise)[:1], t)
    assert w.shape == (b,) and w.dtype == torch.float32 and not w.requires_grad
    assert len(set(w.tolist())) == b  # distinct weights, so a broadcast would be caught above


def test_iw_dsm_weights_by_the_clean_sample_at_t_min():
    schedule = VPLinear()
    ratio = TimeDependentRatio(ExactGaussianLogit(M, schedule), clip=None)
    model = TimeMLP(2, hidden=16, depth=1)
    x0, t, noise = torch.randn(9, 2), schedule.sample_time(9), torch.randn(9, 2)
    _, plain = dsm_loss(model, x0, schedule, t=t, noise=noise)
    _, weighted = iw_dsm_loss(model, x0, schedule, ratio, t=t, noise=noise)
    torch.testing.assert_close(weighted / plain, ratio.weight(x0, torch.full((9,), schedule.t_min)))


def test_gradients_reach_the_score_model_only():
    schedule = VPLinear()
    disc = ExactGaussianLogit(M, schedule)
    ratio = TimeDependentRatio(disc, clip=None)
    model = TimeMLP(2, hidden=16, depth=1)
    x0 = torch.randn(16, 2, requires_grad=True)
    loss, _ = tiw_dsm_loss(model, x0, schedule, ratio)
    loss.backward()
    assert disc.m.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    log_w, grad = ratio.log_weight_and_grad(torch.randn(4, 2), torch.full((4,), 0.5))
    assert not log_w.requires_grad and not grad.requires_grad


def test_bad_inputs_raise_clear_errors():
    schedule = VPLinear()
    model = TimeMLP(2, hidden=8, depth=1)
    ratio = TimeDependentRatio(PerSampleLogit())
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="prediction must be one of"):
        dsm_loss(model, x0, schedule, prediction="noise")
    with pytest.raises(ValueError, match=r"t must have shape \[4\]"):
        dsm_loss(model, x0, schedule, t=torch.rand(3))
    with pytest.raises(ValueError, match="model output has shape"):
        dsm_loss(lambda x, t: x[:, :1], x0, schedule)
    with pytest.raises(ValueError, match="x0 must be"):
        dsm_loss(model, torch.randn(4), schedule)
    with pytest.raises(ValueError, match="x0 is empty"):
        dsm_loss(model, torch.randn(0, 2), schedule)
    with pytest.raises(ValueError, match=r"x0 has NaN or infinite values in samples \[2\]"):
        bad = x0.clone()
        bad[2, 1] = float("nan")
        dsm_loss(model, bad, schedule)
    with pytest.raises(ValueError, match=r"x0 has NaN or infinite values in samples \[1, 3\]"):
        bad = x0.clone()
        bad[[1, 3]] = float("nan")
        tiw_dsm_loss(model, bad, schedule, ratio)
    nan_at_2 = torch.tensor([0.0, 0.0, float("nan"), 0.0]).reshape(4, 1)
    with pytest.raises(ValueError, match=r"per-sample denoising loss has NaN values at sample indices \[2\]"):
        dsm_loss(lambda x, t: x + nan_at_2, x0, schedule)
    with pytest.raises(ValueError, match=r"discriminator logits .* has NaN values at sample indices \[2\]"):
        tiw_dsm_loss(model, x0, schedule, TimeDependentRatio(lambda x, t: x.sum(1) + nan_at_2[:, 0]))
    with pytest.raises(ValueError, match="one logit per sample"):
        tiw_dsm_loss(model, x0, schedule, TimeDependentRatio(lambda x, t: x @ x.T))
