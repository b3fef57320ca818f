import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import noisy_labels as study

CORE = {"CE", "FL", "RW", "DWS", "RENT", "FL (true T)", "RW (true T)", "DWS (true T)", "RENT (true T)"}


def _check(outcome, tmp_path, names):
    assert set(outcome.methods) == {f"sym-50 / {n}" for n in names}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.2 < values[0] <= 1.0  # far above chance (0.1) even after 6 epochs
    parts = {p.name: p for p in outcome.parts}
    assert set(parts) == {"RENT > FL (estimated T, all settings pooled)",
                          "RENT > RW (estimated T, all settings pooled)", "RENT > CE at symmetric 50%"}
    mean = {k: v[0] for k, v in outcome.methods.items()}
    assert parts["RENT > FL (estimated T, all settings pooled)"].margin == pytest.approx(
        mean["sym-50 / RENT"] - mean["sym-50 / FL"])
    # the verdict is on the whole claim: FL is part of it, not only RW and CE
    want = all(mean["sym-50 / RENT"] > mean[f"sym-50 / {o}"] for o in ("FL", "RW", "CE"))
    assert outcome.holds == (want and outcome.baseline.healthy)
    assert abs(outcome.details["observed_noise_rate"]["sym-50"][0] - 0.5) < 0.06
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "outperforms the existing ways" in outcome.summary


def test_smoke_run_of_the_real_study(tmp_path):
    pytest.importorskip("cleanlab")
    assert get_study("noisy-labels") is study.STUDY
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = study.run(ctx, study.CONFIGS["smoke"])
    _check(outcome, tmp_path, CORE | set(study.CLEANLAB_ROWS))
    errors = outcome.details["T_error"]["sym-50"]
    assert set(errors) == {"anchor", "dualt", "cleanlab"} and all(0 <= e[0] <= 2 for e in errors.values())
    assert outcome.left_out == []


def test_without_cleanlab_the_study_runs_and_names_the_rows_it_left_out(tmp_path):
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = study.run(ctx, study.CONFIGS["smoke"], use_cleanlab=False)
    _check(outcome, tmp_path, CORE)
    assert set(outcome.details["T_error"]["sym-50"]) == {"anchor", "dualt"}
    assert len(outcome.left_out) == 1 and "RENT (cleanlab T)" in outcome.left_out[0]
    assert "cleanlab is not installed" in outcome.summary


def _warmup_accuracy(epochs: int) -> float:
    """Clean test accuracy of the study's MLP after ``epochs`` of cross-entropy on 50%-noisy digits."""
    from reweighting.noisy_labels import train_epochs

    x_tr, y_tr, x_te, y_te = study.digits_split(0, 0.3)
    noisy, _ = study.noisy_train_labels(y_tr, "sym-50", 0)
    torch.manual_seed(0)
    model = study.MLP(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_epochs(model, study.Batches(x_tr, noisy, 128, shuffle=True), optimizer, epochs, loss="ce",
                 show_progress=False)
    return study.accuracy(model, x_te, y_te)


def test_baseline_health_check_on_a_broken_and_a_healthy_model():
    broken, healthy = _warmup_accuracy(0), _warmup_accuracy(8)
    assert not study.baseline_health({"sym-50": [broken]}).healthy
    assert study.baseline_health({"sym-50": [healthy]}).healthy
    # the worst setting decides
    assert not study.baseline_health({"sym-20": [healthy], "sym-50": [broken]}).healthy
