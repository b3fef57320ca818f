import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import noisy_labels as study


def test_smoke_run_of_the_real_study(tmp_path):
    assert get_study("noisy-labels") is study.STUDY
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = study.run(ctx, study.CONFIGS["smoke"])
    names = {"CE", "FL", "RW", "DWS", "RENT", "FL (true T)", "RW (true T)", "DWS (true T)", "RENT (true T)",
             "CleanLearning (cleanlab)"}
    assert set(outcome.methods) == {f"sym-50 / {n}" for n in names}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.2 < values[0] <= 1.0  # far above chance (0.1) even after 4 epochs
    mean = {k: v[0] for k, v in outcome.methods.items()}
    want = mean["sym-50 / RENT"] > mean["sym-50 / RW"] and mean["sym-50 / RENT"] > mean["sym-50 / CE"]
    assert outcome.holds == want
    errors = outcome.details["T_error"]["sym-50"]
    assert set(errors) == {"anchor", "dualt", "cleanlab"} and all(0 <= e[0] <= 2 for e in errors.values())
    assert abs(outcome.details["observed_noise_rate"]["sym-50"][0] - 0.5) < 0.06
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "RENT beat RW" in outcome.summary
