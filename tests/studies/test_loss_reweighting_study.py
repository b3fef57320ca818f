"""The loss-reweighting study end to end at its smallest configuration (the real code path)."""

import json

import pytest
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
    # the verdict is what the paired per-seed numbers say
    parts = {p["name"]: p for p in results["parts"]}
    assert set(parts) == {"linupper < uniform (redundant)", "quadratic < uniform (redundant)",
                          *(f"{m} not worse than uniform (clean)" for m in S.CLAIMED)}
    per_seed = results["per_seed"]
    diffs = [u - q for u, q in zip(per_seed["uniform (redundant)"], per_seed["quadratic (redundant)"])]
    assert parts["quadratic < uniform (redundant)"]["margin"] == pytest.approx(sum(diffs) / 2)
    assert parts["quadratic < uniform (redundant)"]["noise"] == pytest.approx(12.706 * abs(diffs[0] - diffs[1]) / 2)
    # twelve steps do not teach the model more than byte frequencies: the baseline is unhealthy, so
    # the comparison is inconclusive rather than a failure of the method
    assert results["baseline_healthy"] is False and results["verdict"] == "inconclusive"
    assert results["baseline"]["bar"] == pytest.approx(results["config"]["unigram_entropy"])
    # Extremes is reported beside the claim, not in it
    assert [p["name"] for p in results["details"]["reported_parts"]] == ["extremes < uniform (redundant)",
                                                                        "extremes < uniform (clean)"]
    shares = results["details"]["duplicate_weight_share"]
    assert all(v == [0.5, 0.5] for v in [shares["uniform"]])  # uniform puts exactly the batch share there
    # even a dozen steps teach the small model the duplicates: LinUpper moves weight off them, inverse onto them
    assert sum(shares["linupper"]) < sum(shares["uniform"]) < sum(shares["inverse"])
    hard = results["details"]["hardest_clean_quarter_share"]
    assert all(0 < v <= 1 for vs in hard.values() for v in vs)
    assert (tmp_path / "loss-reweighting" / "loss_curves.png").stat().st_size > 1000
    assert "Verdict on the whole claim: **inconclusive**" in results["summary"]


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


class _Bigram(torch.nn.Module):
    """A byte bigram model fitted by counting: it knows one byte of context, so it beats the unigram entropy."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        counts = torch.ones(256, 256)
        counts.index_put_((rows[:, :-1].flatten(), rows[:, 1:].flatten()), torch.ones(rows[:, 1:].numel()),
                          accumulate=True)
        self.log_p = (counts / counts.sum(1, keepdim=True)).log()

    def token_losses(self, rows: torch.Tensor) -> torch.Tensor:
        return -self.log_p[rows[:, :-1], rows[:, 1:]]


def test_health_check_on_a_broken_and_a_healthy_model():
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = S.SMOKE
    data = S.load_data(cfg)
    bar = S.unigram_entropy(data.clean)
    assert 2.0 < bar < 5.55  # Python source: well below uniform bytes (log 256)
    torch.manual_seed(0)
    untrained = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    broken = S.evaluate(untrained, data.test, torch.device("cpu"))
    healthy = S.evaluate(_Bigram(data.clean), data.test, torch.device("cpu"))
    assert not S.baseline_health([broken], bar).healthy
    assert S.baseline_health([healthy], bar).healthy


def test_packed_batches_hold_several_documents_per_row_with_flags():
    cfg = S.SMOKE
    data = S.load_data(cfg)
    rows, ids, is_dup = next(iter(S.packed_batches(data, cfg, seed=0)))
    assert rows.shape == ids.shape == (cfg.batch, cfg.seq_len + 1)
    n_docs = ids.max(1).values + 1
    assert bool((n_docs >= 2).all())  # several documents per row
    for b in range(cfg.batch):
        for d in range(int(n_docs[b])):
            doc = rows[b][ids[b] == d]
            assert doc.numel() >= 2
            # a flagged document is the opening of a boilerplate window, exactly (cut only at the row's end)
            if is_dup[b, d]:
                assert any(torch.equal(doc, w[: doc.numel()]) for w in data.boilerplate)
        assert not is_dup[b, int(n_docs[b]):].any()
    again = next(iter(S.packed_batches(data, cfg, seed=0)))
    assert torch.equal(again[0], rows) and torch.equal(again[1], ids)


def test_packed_study_weights_documents(tmp_path):
    from reweighting.studies import get_study

    assert get_study("loss-reweighting-packed") is S.PACKED_STUDY
    ctx = StudyContext(quick=True, seeds=[0, 1], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = S.run_packed(ctx, S.SMOKE)
    assert set(outcome.methods) == set(S.PACKED_METHODS) and all(len(v) == 2 for v in outcome.methods.values())
    # each method runs at the lr of its lowest validation loss in the sweep (seed 0)
    sweep, chosen = outcome.details["sweep_validation"], outcome.details["chosen_lr"]
    for m in S.PACKED_METHODS:
        assert set(sweep[m]) == {str(lr) for lr in S.SMOKE.packed_lrs}
        assert sweep[m][str(chosen[m])] == min(sweep[m].values())
    share = {m: v[0] for m, v in outcome.details["duplicate_weight_share"].items()}
    # uniform puts about the duplicates' token share there; LinUpper on documents moves weight off the
    # (quickly learned, low-loss) duplicate documents, more precisely than weighting whole rows can
    assert share["linupper (documents)"] < share["uniform"]
    assert outcome.details["documents_per_row"] >= 2
    assert {p.name for p in outcome.parts} == {"linupper (documents) < uniform (packed, redundant)",
                                               "quadratic (documents) < uniform (packed, redundant)"}
