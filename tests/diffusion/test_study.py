"""Smoke test of the ``tiw-dsm`` study on its smallest configuration: every method, both data sets, real code path."""

import json
import math

import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import tiw_dsm as S


def test_study_runs_end_to_end_and_reports_every_method(tmp_path):
    torch.manual_seed(0)
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = S.run_with_config(ctx, S.SMOKE)
    assert S.SMOKE.datasets == S.DATASETS  # the smoke run covers the digits code path too
    assert set(outcome.methods) == {f"{ds}: {m}" for ds in S.DATASETS for m in S.METHODS} | {f"rings: {S.EXACT}"}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.0 <= values[0] <= 1.0  # a total-variation distance
    # the parts are recomputed from the reported numbers, not taken from the study's own bookkeeping
    for ds in S.DATASETS:
        tv = {m: outcome.methods[f"{ds}: {m}"] for m in S.METHODS}
        quality = {m: outcome.details["quality"][f"{ds}: {m}"] for m in S.METHODS}
        mine = [p for p in outcome.parts if p.name.startswith(f"{ds}:")]
        recomputed = S.claim_parts(ds, tv, quality)
        assert json.dumps([p.as_dict() for p in mine]) == json.dumps([p.as_dict() for p in recomputed])
    # 30 training steps do not draw rings: the baseline is unhealthy and the verdict inconclusive
    assert not outcome.baseline.healthy and outcome.holds is False
    errors = outcome.details["correction_relative_error_by_sigma"]
    assert len(errors) == 1 and all(v["absolute"] >= 0 and v["exact"] >= 0 for v in errors[0].values())
    # quality is NaN only where a method put too few samples on a mode to score; never infinite
    assert not any(math.isinf(v[0]) for v in outcome.details["quality"].values())
    assert any(math.isfinite(v[0]) for v in outcome.details["quality"].values())
    for plot in outcome.plots:
        assert (tmp_path / plot).stat().st_size > 0
    json.dumps(outcome.details)  # the details go into results.json
    assert get_study("tiw-dsm").run is S.run


def test_long_tailed_sets_and_metrics():
    cfg = S.SMOKE
    rings = S.make_rings(cfg, 0)
    assert rings.reference.shape[0] == round(cfg.reference_share * cfg.ring_biased)
    p = rings.biased_proportions
    assert abs(float(p.max() / p.min()) - cfg.imbalance) < 1e-3
    digits = S.make_digits(cfg, 0)
    assert digits.biased.shape[1] == 64 and float(digits.biased.min()) >= -1 and float(digits.biased.max()) <= 1
    assert float(digits.biased_proportions.max() / digits.biased_proportions.min()) > 0.5 * cfg.imbalance
    # metrics: exact proportions give zero error; a perfect ring sample scores better than a shifted one
    true_points = S.ring_points(cfg, torch.arange(cfg.ring_modes).repeat(100), torch.Generator().manual_seed(0))
    good = S.evaluate_rings(cfg, true_points, 0)
    assert good["tv"] < 1e-6 and good["off_mode"] == 0.0
    bad = S.evaluate_rings(cfg, true_points * 1.1, 0)
    assert bad["quality"] > 2 * good["quality"]
    # the exact ring ratio is log(p_data / p_bias) of the mode at a clean point on a ring
    from reweighting.diffusion import VPCosine

    logit = S.ExactRingLogit(cfg, VPCosine(), rings.true_proportions, rings.biased_proportions)
    on_ring = S.ring_centres(cfg) + torch.tensor([cfg.ring_radius, 0.0])
    want = torch.log(rings.true_proportions / rings.biased_proportions)
    torch.testing.assert_close(logit(on_ring, torch.full((cfg.ring_modes,), 1e-3)), want, atol=1e-3, rtol=0)
    a = torch.randn(300, 5)
    assert S.mmd2(a, torch.randn(300, 5), 1.0) < S.mmd2(a, torch.randn(300, 5) + 1.0, 1.0)


def test_on_ring_health_check_on_blurred_and_sharp_rings():
    cfg = S.SMOKE
    g = torch.Generator().manual_seed(0)
    sharp = S.ring_points(cfg, torch.arange(cfg.ring_modes).repeat(200), g)
    blurred = sharp + 0.15 * torch.randn(sharp.shape, generator=g)  # the modes' blobs, not their rings
    assert S.on_ring_share(cfg, sharp) > 0.99 and S.on_ring_share(cfg, blurred) < 0.5
    assert S.baseline_health([S.on_ring_share(cfg, sharp)]).healthy
    assert not S.baseline_health([S.on_ring_share(cfg, blurred)]).healthy


def test_log_snr_time_sampler_is_uniform_in_log_snr():
    from reweighting.diffusion import VPCosine

    schedule = S.LogSNRTimes(VPCosine())
    t = schedule.sample_time(20_000, generator=torch.Generator().manual_seed(0))
    alpha, sigma = schedule.alpha_sigma(t)
    lam = torch.log(sigma / alpha).double()
    lo, hi = schedule.log_ratio_ends.tolist()
    assert lo - 1e-3 <= float(lam.min()) and float(lam.max()) <= hi + 1e-3
    u = (lam - lo) / (hi - lo)  # uniform on [0, 1]: mean 1/2, each decile about a tenth
    assert abs(float(u.mean()) - 0.5) < 0.01
    counts = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert float((counts - 0.1).abs().max()) < 0.01
    # everything else is the wrapped schedule's
    assert schedule.t_min == VPCosine().t_min and torch.equal(schedule.time_grid(5), VPCosine().time_grid(5))


def test_correction_error_is_zero_for_the_exact_ratio_and_large_for_a_constant_one():
    from reweighting.diffusion import TimeDependentRatio, VPCosine

    cfg = S.SMOKE
    rings = S.make_rings(cfg, 0)
    logit = S.ExactRingLogit(cfg, VPCosine(), rings.true_proportions, rings.biased_proportions)
    exact = TimeDependentRatio(logit, reference_fraction=0.05, clip=cfg.clip)
    same = S.correction_error_by_noise(exact, exact, rings, VPCosine(), "cpu", n=200)
    assert all(v["absolute"] == 0.0 and (v["relative"] == 0.0 or math.isnan(v["relative"])) for v in same.values())
    assert math.isnan(same["0.03"]["relative"])  # the exact correction is ~0 there: no ratio

    class Flat(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros(x.shape[0]) + 0.0 * x.sum(1)

    flat = TimeDependentRatio(Flat(), reference_fraction=0.05, clip=cfg.clip)
    off = S.correction_error_by_noise(flat, exact, rings, VPCosine(), "cpu", n=200)
    # no correction at all: an error as large as the correction (where there is one: at sigma 0.03 the
    # exact log-ratio is flat along each ring, so the correction is ~0 there)
    assert all(abs(v["relative"] - 1.0) < 1e-6 and v["absolute"] == pytest.approx(v["exact"])
               for k, v in off.items() if float(k) >= 0.1)
