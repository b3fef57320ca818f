"""Sweep of plausible bad inputs to the TIW-DSM API: a clear error naming the argument, or the right answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reweighting as rw
from reweighting.diffusion import (
    EDM,
    VE,
    TimeDependentDiscriminator,
    TimeDependentRatio,
    TimeMLP,
    VPCosine,
    VPLinear,
    dsm_loss,
    iw_dsm_loss,
    log_ratio_from_logit,
    make_schedule,
    sample_ancestral,
    sample_ode,
    tiw_dsm_loss,
    train_discriminator,
)

D = 2
SCHEDULE = VPLinear()


def _score():
    torch.manual_seed(0)
    return TimeMLP(D, hidden=8, depth=1)


def _ratio():
    torch.manual_seed(1)
    return TimeDependentRatio(TimeDependentDiscriminator(TimeMLP(D, 1, hidden=8, depth=1, squeeze=True)).eval())


def _x0(n=6, dtype=torch.float32):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(2)).to(dtype)


def _with_nan(x, rows):
    x = x.clone()
    x[rows, 0] = float("nan")
    return x


def _fit(reference=None, biased=None, **kw):
    torch.manual_seed(3)
    disc = TimeDependentDiscriminator(TimeMLP(D, 1, hidden=8, depth=1, squeeze=True))
    reference = _x0(20) if reference is None else reference
    biased = _x0(30) + 1 if biased is None else biased
    kw.setdefault("steps", 3)
    kw.setdefault("batch_size", 8)
    return train_discriminator(disc, reference, biased, SCHEDULE, show_progress=False, **kw), disc


CASES = {
    # dtypes: the network's `mat1 and mat2 must have the same dtype` replaced by an error naming the argument
    "float64 x0": (lambda: dsm_loss(_score(), _x0(dtype=torch.float64), SCHEDULE), TypeError,
                   r"x0 is torch.float64 but the model's parameters are torch.float32"),
    "bfloat16 x0": (lambda: tiw_dsm_loss(_score(), _x0(dtype=torch.bfloat16), SCHEDULE, _ratio()), TypeError,
                    r"x0 is torch.bfloat16 but the model's parameters"),
    "float64 x0, float64 model, float32 discriminator": (
        lambda: tiw_dsm_loss(_score().double(), _x0(dtype=torch.float64), SCHEDULE, _ratio()), TypeError,
        r"x0 is torch.float64 but the discriminator's parameters are torch.float32"),
    "integer x0": (lambda: dsm_loss(_score(), _x0().long(), SCHEDULE), TypeError, "x0 must be a floating-point"),
    "float64 x_t to the ratio": (lambda: _ratio().log_weight(_x0(dtype=torch.float64), torch.full((6,), 0.5)),
                                 TypeError, r"x_t is torch.float64 but the discriminator's"),
    "float64 x_T to the sampler": (lambda: sample_ode(_score(), (6, D), SCHEDULE, steps=2,
                                                      x_T=_x0(dtype=torch.float64)), TypeError, "x_T is torch.float64"),
    # non-finite data, named (not blamed on the discriminator's logits)
    "NaN in x0 (TIW-DSM)": (lambda: tiw_dsm_loss(_score(), _with_nan(_x0(), [1, 4]), SCHEDULE, _ratio()), ValueError,
                            r"x0 has NaN or infinite values in samples \[1, 4\]"),
    "NaN in x0 (IW-DSM)": (lambda: iw_dsm_loss(_score(), _with_nan(_x0(), [0]), SCHEDULE, _ratio()), ValueError,
                           r"x0 has NaN .* \[0\]"),
    "inf in x0 (DSM)": (lambda: dsm_loss(_score(), _x0().index_fill(0, torch.tensor([5]), float("inf")), SCHEDULE),
                        ValueError, r"x0 has NaN or infinite values in samples \[5\]"),
    "NaN in x_t to the ratio": (lambda: _ratio().log_weight(_with_nan(_x0(), [2]), torch.full((6,), 0.5)),
                                ValueError, r"x_t has NaN .* \[2\]"),
    "NaN in noise": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, noise=_with_nan(_x0(), [3])), ValueError,
                     r"noise has NaN .* \[3\]"),
    "NaN in reference": (lambda: _fit(reference=_with_nan(_x0(20), [7])), ValueError,
                         r"reference has NaN or infinite values in samples \[7\]"),
    "NaN in biased": (lambda: _fit(biased=_with_nan(_x0(30), [0, 29])), ValueError, r"biased has NaN .* \[0, 29\]"),
    "NaN in x_T": (lambda: sample_ancestral(_score(), (6, D), SCHEDULE, steps=2, x_T=_with_nan(_x0(), [1])),
                   ValueError, r"x_T has NaN .* \[1\]"),
    # diffusion times out of range
    "t above t_max": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, t=torch.full((6,), 1.5)), ValueError,
                      r"t must lie in the schedule's range \[t_min, t_max\] = \[0.001, 1\]"),
    "negative t": (lambda: tiw_dsm_loss(_score(), _x0(), SCHEDULE, _ratio(), t=torch.full((6,), -0.1)), ValueError,
                   r"t must lie in the schedule's range .* sample indices \[0, 1, 2, 3, 4, 5\]"),
    "NaN t": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, t=torch.tensor([0.5] * 5 + [float("nan")])), ValueError,
              r"t must lie in the schedule's range .* \[5\]"),
    "EDM t below sigma_min": (lambda: dsm_loss(_score(), _x0(), EDM(), t=torch.full((6,), 1e-4)), ValueError,
                              r"\[0.002, 80\] \(EDM\)"),
    "add_noise at t = 2": (lambda: VE().add_noise(_x0(), torch.full((6,), 2.0)), ValueError, "t must lie in"),
    "integer t": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, t=torch.ones(6, dtype=torch.long)), TypeError,
                  "t must be a floating-point"),
    "NaN t to the ratio": (lambda: _ratio().log_weight(_x0(), torch.full((6,), float("nan"))), ValueError,
                           r"t has NaN"),
    # shapes
    "x0 of wrong width for the model": (lambda: dsm_loss(_score(), torch.randn(6, 3), SCHEDULE), ValueError,
                                        r"x has 3 features per sample .* dim=2"),
    "t of wrong length": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, t=torch.rand(5)), ValueError,
                          r"t must have shape \[6\]"),
    "noise of wrong shape": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, noise=torch.randn(6, 3)), ValueError,
                             "noise must be shaped like x0"),
    "x_T of wrong shape": (lambda: sample_ode(_score(), (6, D), SCHEDULE, steps=2, x_T=torch.randn(5, D)),
                           ValueError, r"x_T has shape \(5, 2\) but shape is \(6, 2\)"),
    "shape not a tuple": (lambda: sample_ode(_score(), 6, SCHEDULE, steps=2), ValueError, "shape must be a tuple"),
    "reference and biased widths differ": (lambda: _fit(reference=torch.randn(20, 3)), ValueError,
                                           "reference samples have shape"),
    # options
    "prediction typo": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, prediction="epsilon"), ValueError,
                        "prediction must be one of"),
    "schedule a string": (lambda: dsm_loss(_score(), _x0(), "vp-linear"), TypeError, "schedule must be a NoiseSched"),
    "ratio a discriminator": (lambda: tiw_dsm_loss(_score(), _x0(), SCHEDULE, _ratio().discriminator), TypeError,
                              "ratio must be a TimeDependentRatio"),
    "loss_weight a number": (lambda: dsm_loss(_score(), _x0(), SCHEDULE, loss_weight=2.0), TypeError,
                             "loss_weight must be a function"),
    "sampler steps 0": (lambda: sample_ode(_score(), (6, D), SCHEDULE, steps=0), ValueError,
                        "steps must be an integer >= 1"),
    "sampler steps 2.5": (lambda: sample_ode(_score(), (6, D), SCHEDULE, steps=2.5), ValueError,
                          "steps must be a whole number"),
    "sampler method typo": (lambda: sample_ode(_score(), (6, D), SCHEDULE, method="rk4"), ValueError,
                            "method must be 'heun' or 'euler'"),
    "sampler prediction typo": (lambda: sample_ancestral(_score(), (6, D), SCHEDULE, prediction="x_0"), ValueError,
                                "prediction must be one of"),
    "discriminator steps 2.5": (lambda: _fit(steps=2.5), ValueError, "steps must be a whole number"),
    "discriminator batch_size 1": (lambda: _fit(batch_size=1), ValueError, "batch_size must be an integer >= 2"),
    "discriminator lr 0": (lambda: _fit(lr=0.0), ValueError, "lr must be a finite number > 0"),
    "holdout_fraction 1.5": (lambda: _fit(holdout_fraction=1.5), ValueError, "holdout_fraction must be in"),
    "discriminator list data": (lambda: _fit(reference=_x0(20).tolist()), TypeError, "reference must be a torch"),
    "discriminator not a module": (lambda: train_discriminator(lambda x, t: x.sum(1), _x0(20), _x0(30), SCHEDULE),
                                   TypeError, "discriminator must be a torch.nn.Module"),
    "schedule name typo": (lambda: make_schedule("vp_linear"), ValueError, "schedule must be one of"),
    "schedule option typo": (lambda: make_schedule("ve", sigma_mx=10.0), TypeError, "sigma_mx"),
    "cosine t_max 1": (lambda: VPCosine(t_max=1.0), ValueError, "t_max must be < 1"),
    "clip 0": (lambda: log_ratio_from_logit(torch.zeros(3), clip=0.0), ValueError, "clip must be"),
    "reference_fraction 2": (lambda: TimeDependentRatio(nn.Identity(), reference_fraction=2.0), ValueError,
                             r"reference_fraction must be in \[0, 1\]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    fn, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        fn()


def test_discriminator_converts_data_to_its_dtype():
    # float64 (numpy) and bfloat16 data are converted to the discriminator's dtype, clearly documented:
    # the fit is the same as with float32 data.
    fits = {}
    for dtype in (torch.float32, torch.float64):
        fit, disc = _fit(reference=_x0(20).to(dtype), biased=(_x0(30) + 1).to(dtype))
        fits[dtype] = (fit.best_holdout_loss, [p.detach().clone() for p in disc.parameters()])
    assert fits[torch.float32][0] == fits[torch.float64][0]
    for a, b in zip(fits[torch.float32][1], fits[torch.float64][1]):
        assert torch.equal(a, b)
    fit, _ = _fit(reference=_x0(20).bfloat16(), biased=(_x0(30) + 1).bfloat16())
    assert 0 < fit.best_holdout_loss < 10


def test_float64_end_to_end_when_everything_is_float64():
    score = _score().double()
    ratio = TimeDependentRatio(TimeDependentDiscriminator(TimeMLP(D, 1, hidden=8, depth=1, squeeze=True)).double())
    loss, per_sample = tiw_dsm_loss(score, _x0(dtype=torch.float64), SCHEDULE, ratio)
    assert torch.isfinite(loss) and per_sample.shape == (6,)
    assert sample_ode(score, (3, D), SCHEDULE, steps=2).dtype == torch.float64


def test_diverged_discriminator_raises_instead_of_a_nan_holdout_loss():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return self.w * x.sum(1) * float("inf")

    with pytest.raises(ValueError, match="held-out loss is nan at step 0"):
        train_discriminator(Exploding(), _x0(20), _x0(30) + 1, SCHEDULE, steps=2, show_progress=False)


def test_checks_off_skips_value_checks():
    # set_checks(False) removes the host reads: a time out of range (but computable) is then not looked at
    t = torch.full((6,), 1.2)
    with pytest.raises(ValueError, match="t must lie in"):
        dsm_loss(_score(), _x0(), VE(), t=t)
    with rw.checks(False):
        loss, _ = dsm_loss(_score(), _x0(), VE(), t=t)
    assert torch.isfinite(loss)


def test_counts():
    assert len(CASES) >= 40
