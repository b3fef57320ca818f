"""One replicate of the Q-probe studies: beta chosen on the validation prompts only, the shuffled-reward
control, and the declared parts (synthetic features whose answer is known)."""

from types import SimpleNamespace

import pytest
import torch

from reweighting.qprobe import expected_return
from reweighting.studies.qprobe_eval import (
    CONTROL,
    OBJECTIVES,
    PAPER_SHARE,
    TUNED,
    SampleSet,
    declare_parts,
    fit_and_evaluate,
    part_names,
    per_prompt_return,
    shuffle_within_prompts,
    tune_beta,
)

CFG = SimpleNamespace(ks=(1, 2, 8), betas=(0.0, 0.1, 1.0, 10.0), probe_lr=1e-2, probe_epochs=30, probe_batch=200,
                      weight_decay=0.0, beta_resamples=50)
CTX = SimpleNamespace(device=torch.device("cpu"))


def synthetic(prompts: int, n: int, g: torch.Generator, sign: float = 1.0, dim: int = 64) -> SampleSet:
    """0/1 rewards (a third right); feature 0 is ``sign * reward`` plus noise, the other ``dim - 1`` are
    noise (so a random direction carries little of the signal), no two completions share a feature."""
    rewards = (torch.rand(prompts, n, generator=g) < 0.3).float()
    features = torch.randn(prompts, n, dim, generator=g)
    features[..., 0] = sign * rewards + 0.3 * features[..., 0]
    return SampleSet(features, rewards)


def test_per_prompt_return_averages_to_expected_return():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(7, 8, generator=g), (torch.rand(7, 8, generator=g) < 0.4).float()
    for k in (1, 3, 8):
        for beta in (0.0, 0.5):
            want = float(expected_return(q, r, k, beta))
            assert float(per_prompt_return(q, r, k, beta).mean()) == pytest.approx(want)


def test_tune_beta_picks_the_best_on_the_given_prompts_with_its_stability():
    r = torch.tensor([[1.0, 0, 0, 0]] * 6)
    helpful = torch.tensor([[5.0, 0, 0, 0]] * 6)
    sel = tune_beta(helpful, r, 4, (0.0, 0.1, 10.0), resamples=50, seed=0)
    assert sel.chosen == 0.0 and sel.stability == 1.0
    misleading = torch.tensor([[0.0, 5, 5, 5]] * 6)
    sel = tune_beta(misleading, r, 4, (0.0, 0.1, 10.0), resamples=50, seed=0)
    assert sel.chosen == 10.0  # the softest choice loses least when Q points the wrong way
    # at k = 1 every beta gives the same return: the first listed is kept, whatever is best at k = 4
    assert tune_beta(misleading, r, 1, (0.0, 0.1, 10.0), resamples=50, seed=0).chosen == 0.0
    # at a k above the samples per prompt, beta is chosen at the samples per prompt
    assert tune_beta(helpful, r, 48, (0.0, 10.0), resamples=10, seed=0).chosen == 0.0


def test_shuffle_within_prompts_keeps_each_prompts_rewards():
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(50, 8, generator=g) < 0.4).float()
    s = shuffle_within_prompts(r, torch.Generator().manual_seed(1))
    assert torch.equal(s.sort(dim=1).values, r.sort(dim=1).values)
    assert not torch.equal(s, r)
    assert torch.equal(s, shuffle_within_prompts(r, torch.Generator().manual_seed(1)))


def test_probes_learn_the_signal_and_the_shuffled_control_does_not():
    out = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        fit, val, test = synthetic(120, 8, g), synthetic(40, 8, g), synthetic(80, 8, g)
        out.append(fit_and_evaluate(CFG, fit, val, test, seed, CTX))
    for r in out:
        assert set(r["probes"]) == {*OBJECTIVES, CONTROL}
        for name in OBJECTIVES:
            assert r["probes"][name][TUNED][8] > r["baseline"] + 0.3  # the signal is strong
        # the control learned from rewards that no longer belong to their completions
        assert r["probes"][CONTROL][TUNED][8] < r["baseline"] + 0.1
    # a probe's tuned result is its result at the chosen beta
    r = out[0]
    assert r["probes"]["L_PG"][TUNED][8] == r["probes"]["L_PG"][r["tuned_beta"]["L_PG"][8]][8]


def test_beta_is_chosen_on_the_validation_prompts_not_the_test_prompts():
    g = torch.Generator().manual_seed(5)
    fit, test = synthetic(120, 8, g), synthetic(80, 8, g)
    # validation prompts where the feature points the other way: there the softest beta loses least
    flipped = synthetic(40, 8, g, sign=-1.0)
    r = fit_and_evaluate(CFG, fit, flipped, test, 0, CTX)
    assert r["tuned_beta"]["L_PG"][8] == 10.0
    best_on_test = max(r["probes"]["L_PG"][b][8] for b in CFG.betas)
    assert r["probes"]["L_PG"][TUNED][8] < best_on_test - 0.2


def test_declared_parts_scale_the_papers_shares():
    parts = declare_parts((1, 2, 4, 8, 16, 48), headroom=0.5, control_tolerance=0.02)
    assert [p.name for p in parts] == part_names((1, 2, 4, 8, 16, 48))
    by_name = {p.name: p for p in parts}
    assert by_name["L_PG > pass@1 (k=48)"].expected == round(0.5 * 0.17 / 0.47, 3)
    assert by_name["L_Q > pass@1 (k=48)"].expected == round(0.5 * PAPER_SHARE["L_Q > pass@1"], 3)
    assert by_name["L_PG improves from k=16 to k=48"].expected is None
    control = by_name["control: shuffled-reward L_PG no better than pass@1 (k=48)"]
    assert (control.kind, control.tolerance) == ("not worse", 0.02)
    assert [n for n in by_name if "improves" in n] == ["L_PG improves from k=8 to k=16",
                                                       "L_PG improves from k=16 to k=48"]


def test_the_control_part_fails_when_the_shuffled_probe_beats_pass_at_1():
    from reweighting.studies.qprobe import FULL, protocol_for
    from reweighting.studies.qprobe_report import claim_parts

    protocol = protocol_for(FULL, 4)
    k = max(FULL.ks)

    def runs(control: list[float]) -> list[dict]:
        return [{"baseline": 0.3, "probes": {**{n: {TUNED: {kk: 0.6 for kk in FULL.ks}} for n in OBJECTIVES},
                                             CONTROL: {TUNED: {kk: c for kk in FULL.ks}}}} for c in control]

    name = f"control: shuffled-reward L_PG no better than pass@1 (k={k})"
    ok = {p.name: p for p in claim_parts(protocol, FULL.ks, runs([0.30, 0.29, 0.31, 0.30]))}[name]
    assert ok.verdict == "holds"
    leak = {p.name: p for p in claim_parts(protocol, FULL.ks, runs([0.45, 0.44, 0.46, 0.45]))}[name]
    assert leak.verdict == "does not hold"
    # below pass@1 is no leak: the part still holds
    low = {p.name: p for p in claim_parts(protocol, FULL.ks, runs([0.20, 0.21, 0.19, 0.20]))}[name]
    assert low.verdict == "holds"
