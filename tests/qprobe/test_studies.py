import json

import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies.qprobe import SMOKE, run_arithmetic


@pytest.fixture
def one_thread():
    # Tiny models run faster on one thread than on two that contend for a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_qprobe_study_smoke(tmp_path, one_thread):
    assert get_study("qprobe").seeds >= 5
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = run_arithmetic(SMOKE, ctx)
    assert set(outcome.methods) == {"pass@1", "L_Q", "L_CE", "L_PG", f"pass@{max(SMOKE.ks)} (oracle)"}
    values = {name: v[0] for name, v in outcome.methods.items()}
    # The oracle bounds every selection rule from above, and one sample's reward is in [0, 1].
    for name in ("pass@1", "L_Q", "L_CE", "L_PG"):
        assert 0.0 <= values[name] <= values[f"pass@{max(SMOKE.ks)} (oracle)"] + 1e-6
    parts = {p.name: p for p in outcome.parts}
    k_max, k_mid = max(SMOKE.ks), sorted(SMOKE.ks)[len(SMOKE.ks) // 2]
    assert set(parts) == {"L_Q > pass@1 (k=8)", "L_CE > pass@1 (k=8)", "L_PG > pass@1 (k=8)", "L_PG > L_CE (k=8)",
                          "L_PG > L_Q (k=8)", f"L_PG improves from k={k_mid} to k={k_max}"}
    assert parts["L_PG > L_CE (k=8)"].margin == pytest.approx(values["L_PG"] - values["L_CE"])
    # beta is chosen per k on the training prompts
    assert set(outcome.config["tuned_beta"][0]["L_PG"]) == set(SMOKE.ks)
    # SMOKE's GPT trains for 40 steps: it never writes a right answer, so the baseline is unhealthy and
    # the verdict cannot be "holds" (it is inconclusive, not a failure of the method)
    assert not outcome.baseline.healthy and outcome.holds is False
    for plot in outcome.plots:
        assert (tmp_path / plot).stat().st_size > 0
    json.dumps(outcome.details, default=str)


def test_health_check_on_a_broken_and_a_healthy_toy():
    from reweighting.studies.lm import GPTConfig, TinyGPT
    from reweighting.studies.qprobe import ALPHABET, MAX_NEW, PROMPT_LEN, _sample, baseline_health

    # broken: an untrained GPT never writes the sum, so there is nothing to choose among its samples
    torch.manual_seed(0)
    untrained = TinyGPT(GPTConfig(vocab_size=len(ALPHABET), context=PROMPT_LEN + MAX_NEW, dim=16, layers=1, heads=2))
    pairs = torch.tensor([[12, 34], [56, 21], [40, 40], [99, 10]])
    rewards = _sample(untrained.eval(), pairs, 8, torch.Generator().manual_seed(0), "cpu")["rewards"]
    assert not baseline_health([float(rewards.mean())], [float(rewards.max(1).values.mean())], 8).healthy
    # healthy: right in about a third of the samples, so the best of 8 usually is
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(50, 8, generator=g) < 0.3).float()
    assert baseline_health([float(rewards.mean())], [float(rewards.max(1).values.mean())], 8).healthy
    # always right: no room for a choice either
    assert not baseline_health([1.0], [1.0], 8).healthy


def test_keeps_improving_is_judged_at_every_step_from_the_middle_k():
    from dataclasses import replace

    from reweighting.studies.qprobe import FULL, OBJECTIVES, TUNED, claim_parts

    cfg = replace(FULL, ks=(1, 2, 4, 8, 16, 48))
    curve = {1: 0.3, 2: 0.4, 4: 0.5, 8: 0.6, 16: 0.62, 48: 0.61}  # peaks at 16
    runs = [{"baseline": 0.3, "probes": {n: {TUNED: dict(curve)} for n in OBJECTIVES}}]
    steps = {p.name: p for p in claim_parts(cfg, runs) if "improves" in p.name}
    assert set(steps) == {"L_PG improves from k=8 to k=16", "L_PG improves from k=16 to k=48"}
    assert steps["L_PG improves from k=8 to k=16"].verdict == "holds"
    assert steps["L_PG improves from k=16 to k=48"].verdict == "does not hold"  # 8 -> 48 alone would hide it
