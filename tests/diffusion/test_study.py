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
    labels = {0.05: "5%", 0.02: "2%", 0.005: "0.5%"}
    assert set(outcome.methods) == {f"{labels[s]}: {m}" for s in S.SHARES for m in S.SWEEP_METHODS[s]}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.0 <= values[0] <= 1.0  # a total-variation distance
    # the parts are recomputed from the reported numbers, not taken from the study's own bookkeeping
    tv = {m: outcome.methods[f"5%: {m}"] for m in S.METHODS}
    quality = {m: outcome.details["quality"][f"0.5%: {m}"] for m in S.SWEEP_METHODS[0.005]}
    recomputed = S.claim_parts(S.make_protocol(S.SMOKE, 1), tv, quality)
    assert json.dumps([p.as_dict() for p in outcome.parts]) == json.dumps([p.as_dict() for p in recomputed])
    assert [p.name for p in outcome.parts] == S.part_names()
    # 30 training steps do not draw rings: the baseline is unhealthy and the verdict inconclusive
    assert not outcome.baseline.healthy and outcome.holds is False
    errors = outcome.details["ratio_error_by_sigma"]
    assert set(errors) == {"5%", "0.5%"}  # where a discriminator is trained
    assert all(v["absolute"] >= 0 and v["exact"] >= 0 and v["log_w_rmse"] >= 0 for v in errors["5%"][0].values())
    # the discriminators of the two shares saw reference sets of their share's size
    refs = [d["reference"] for d in outcome.details["discriminators"]["5%"] + outcome.details["discriminators"]["0.5%"]]
    assert refs == [round(0.05 * S.SMOKE.ring_biased), round(0.005 * S.SMOKE.ring_biased)]
    # quality is NaN only where a method put too few samples on a mode to score; never infinite
    assert not any(math.isinf(v[0]) for v in outcome.details["quality"].values())
    for plot in outcome.plots:
        assert (tmp_path / plot).stat().st_size > 0
    json.dumps(outcome.details)  # the details go into results.json
    assert get_study("tiw-dsm").run is S.run


def test_reference_sets_are_nested_over_shares_and_redrawn_per_seed():
    from dataclasses import replace

    cfg = S.SMOKE
    big, small = S.make_rings(cfg, 0), S.make_rings(replace(cfg, reference_share=0.005), 0)
    assert torch.equal(big.biased, small.biased)
    assert torch.equal(small.reference, big.reference[: small.reference.shape[0]])
    other = S.make_rings(cfg, 1)
    assert not torch.equal(other.biased, big.biased) and not torch.equal(other.reference, big.reference)
    with pytest.raises(ValueError, match="reference_share"):
        S.make_rings(replace(cfg, reference_share=0.0), 0)


def test_claim_parts_decide_on_the_right_numbers():
    proto = S.make_protocol(S.FULL, 3)
    tv = {"DSM(obs)": [0.30, 0.28, 0.29], "TIW-DSM": [0.10, 0.12, 0.11], "IW-DSM": [0.20, 0.19, 0.21],
          "correction-only": [0.11, 0.12, 0.10], "weighting-only": [0.29, 0.30, 0.28], "DSM(ref)": [0.05] * 3}
    quality = {"TIW-DSM": [0.03, 0.035, 0.032], "DSM(ref)": [0.09, 0.1, 0.095]}
    parts = {p.name: p for p in S.claim_parts(proto, tv, quality)}
    names = S.part_names()
    assert parts[names[0]].margin == pytest.approx(0.18) and parts[names[0]].verdict == "holds"
    assert parts[names[1]].margin == pytest.approx(0.09)
    # quarter line: TIW + (obs - TIW) / 4 = 0.15, 0.16, 0.155
    assert parts[names[2]].margin == pytest.approx((0.04 + 0.04 + 0.055) / 3)
    assert parts[names[3]].margin == pytest.approx((0.14 + 0.14 + 0.125) / 3)
    assert parts[names[4]].margin == pytest.approx(0.188 / 3) and parts[names[4]].verdict == "holds"
    # swapping the roles turns each part
    flipped = S.claim_parts(proto, {**tv, "TIW-DSM": tv["DSM(obs)"], "DSM(obs)": tv["TIW-DSM"]},
                            {"TIW-DSM": quality["DSM(ref)"], "DSM(ref)": quality["TIW-DSM"]})
    assert flipped[0].verdict == "does not hold" and flipped[4].verdict == "does not hold"


def test_long_tailed_sets_and_metrics():
    cfg = S.SMOKE
    rings = S.make_rings(cfg, 0)
    assert rings.reference.shape[0] == round(cfg.reference_share * cfg.ring_biased)
    p = rings.biased_proportions
    assert abs(float(p.max() / p.min()) - cfg.imbalance) < 1e-3
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


def test_ratio_error_is_zero_for_the_exact_ratio_and_large_for_a_constant_one():
    from reweighting.diffusion import TimeDependentRatio, VPCosine

    cfg = S.SMOKE
    rings = S.make_rings(cfg, 0)
    logit = S.ExactRingLogit(cfg, VPCosine(), rings.true_proportions, rings.biased_proportions)
    exact = TimeDependentRatio(logit, reference_fraction=0.05, clip=cfg.clip)
    same = S.ratio_error_by_noise(exact, exact, rings, VPCosine(), "cpu", n=200)
    assert all(v["absolute"] == 0.0 and v["log_w_rmse"] == 0.0 and (v["relative"] == 0.0 or math.isnan(v["relative"]))
               for v in same.values())
    assert math.isnan(same["0.03"]["relative"])  # the exact correction is ~0 there: no ratio

    class Flat(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros(x.shape[0]) + 0.0 * x.sum(1)

    flat = TimeDependentRatio(Flat(), reference_fraction=0.05, clip=cfg.clip)
    off = S.ratio_error_by_noise(flat, exact, rings, VPCosine(), "cpu", n=200)
    # no correction at all: an error as large as the correction (where there is one: at sigma 0.03 the
    # exact log-ratio is flat along each ring, so the correction is ~0 there)
    assert all(abs(v["relative"] - 1.0) < 1e-6 and v["absolute"] == pytest.approx(v["exact"])
               for k, v in off.items() if float(k) >= 0.1)
    # the weights are wrong too: the exact log-ratio of a clean point is log(p_data / p_bias) of its mode
    assert off["0.03"]["log_w_rmse"] > 0.3 and same["0.03"]["log_w_rmse"] == 0.0
    # by hand at sigma = 0.9: the flat ratio's log-weight is that of logit 0, so the RMSE is that of the difference
    t = S.LogSNRTimes(VPCosine()).time_for_log_ratio(torch.tensor([math.log(0.9 / math.sqrt(1 - 0.81))]))
    g = torch.Generator().manual_seed(90_000)
    stream = torch.cat([rings.biased, rings.reference])
    x0 = stream[torch.randint(stream.shape[0], (200,), generator=g)]
    noise = torch.randn(x0.shape, generator=g)
    alpha, sigma = VPCosine().alpha_sigma(t.expand(200))
    x_t = alpha[:, None] * x0 + sigma[:, None] * noise
    diff = flat.log_weight(x_t, t.expand(200)) - exact.log_weight(x_t, t.expand(200))
    assert off["0.9"]["log_w_rmse"] == pytest.approx(float(diff.pow(2).mean().sqrt()), rel=1e-4)
