"""The loss-reweighting study end to end at its smallest configuration (the real code path)."""

import json

import torch

from reweighting.studies import StudyContext, all_studies, run_study
from reweighting.studies import loss_reweighting as S
from reweighting.studies.lm import python_version


def test_study_runs_and_reports(tmp_path, monkeypatch):
    study = all_studies()["loss-reweighting"]
    # run_study at the SMOKE size: the registry's run, the results file and the plot are the real ones
    monkeypatch.setattr(S, "QUICK", S.SMOKE)
    results = run_study(study, quick=True, num_seeds=2, out_dir=tmp_path, show_progress=False)
    on_disk = json.loads((tmp_path / "loss-reweighting" / "results.json").read_text())
    assert on_disk["study"] == "loss-reweighting" and on_disk["quick"] is True
    assert results["config"]["python"] == python_version()  # the corpus depends on it
    names = {f"{m} ({s})" for m in S.METHODS for s in S.SETTINGS}
    assert set(results["methods"]) == names
    for summary in results["methods"].values():
        assert summary["n"] == 2 and 0 < summary["mean"] < 6  # nats per byte: below log(256) = 5.55
    verdict = results["details"]["verdict"]
    # holds is what the numbers say
    beat = all(verdict["redundant"][m]["beats_uniform"] for m in ("linupper", "quadratic"))
    ok = all(verdict["clean"][m]["within_noise"] or verdict["clean"][m]["diff_vs_uniform"] < 0
             for m in S.PAPER_METHODS)
    assert results["holds"] == (beat and ok)
    shares = results["details"]["duplicate_weight_share"]
    assert all(v == [0.5, 0.5] for v in [shares["uniform"]])  # uniform puts exactly the batch share there
    # even a dozen steps teach the small model the duplicates: LinUpper moves weight off them, inverse onto them
    assert sum(shares["linupper"]) < sum(shares["uniform"]) < sum(shares["inverse"])
    hard = results["details"]["hardest_clean_quarter_share"]
    assert all(0 < v <= 1 for vs in hard.values() for v in vs)
    assert (tmp_path / "loss-reweighting" / "loss_curves.png").stat().st_size > 1000
    assert "Claim" in results["summary"]


def test_batches_hold_the_configured_duplicate_share():
    cfg = S.SMOKE
    data = S.load_data(cfg)
    for setting, share in (("redundant", cfg.duplicate_share), ("clean", 0.0)):
        stream = list(S.batches(data, cfg, setting, seed=0))
        assert len(stream) == cfg.steps
        for rows, is_dup in stream:
            assert rows.shape == (cfg.batch, cfg.seq_len + 1) and float(is_dup.float().mean()) == share
            # a row flagged as duplicate is one of the boilerplate windows, and the others are not
            hit = (rows[:, None, :] == data.boilerplate[None]).all(-1).any(-1)
            assert torch.equal(hit, is_dup)
        # the same seed gives the same stream (methods are compared on identical batches)
        again = next(iter(S.batches(data, cfg, setting, seed=0)))
        assert torch.equal(again[0], stream[0][0])


def test_context_fields_are_used(tmp_path):
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    cfg = S.SMOKE
    one = S.train(S.load_data(cfg), cfg, "clean", "uniform", 3e-3, 0, ctx.device, curve=True)
    assert [s for s, _ in one["curve"]] == [cfg.steps // 2, cfg.steps] and one["duplicate_weight_share"] == 0.0
