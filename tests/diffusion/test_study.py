"""Smoke test of the ``tiw-dsm`` study on its smallest configuration: every method, both data sets, real code path."""

import json
import math

import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import tiw_dsm as S


def test_study_runs_end_to_end_and_reports_every_method(tmp_path):
    torch.manual_seed(0)
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = S.run_with_config(ctx, S.SMOKE)
    assert set(outcome.methods) == {f"{ds}: {m}" for ds in S.DATASETS for m in S.METHODS} | {f"rings: {S.EXACT}"}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.0 <= values[0] <= 1.0  # a total-variation distance
    parts = outcome.details["claim_parts"]
    assert outcome.holds == all(all(p.values()) for p in parts.values())
    # the verdict is recomputed from the reported numbers, not taken from the study's own bookkeeping
    for ds in S.DATASETS:
        tv = {m: outcome.methods[f"{ds}: {m}"][0] for m in S.METHODS}
        quality = {m: outcome.details["quality"][f"{ds}: {m}"][0] for m in S.METHODS}
        assert parts[ds] == S.claim_parts(tv, quality)
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
