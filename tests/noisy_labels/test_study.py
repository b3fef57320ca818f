import pytest
import torch

from reweighting.studies import StudyContext, _check_declared, get_study
from reweighting.studies import noisy_labels as study
from reweighting.studies import noisy_labels_run as runs

CORE = {"CE", "FL", "RW", "DWS", "RENT", "RENT (true T)"}
PARTS = [study.PART_FL, study.PART_RW, study.PART_CE]


@pytest.fixture(autouse=True)
def one_thread():
    """As ``reproduce`` runs a study: one intra-op thread (on a busy machine more threads only spin)."""
    from reweighting.studies import deterministic

    with deterministic(1):
        yield


def _smoke(tmp_path, **kw):
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False,
                       selection_seeds=[1000])
    return study.run(ctx, study.CONFIGS["smoke"], weight_decays=(0.0, 1e-3), workers=1, **kw)


def test_smoke_run_of_the_real_study(tmp_path):
    assert get_study("noisy-labels") is study.STUDY
    outcome = _smoke(tmp_path)
    selected = {k: v for k, v in outcome.methods.items() if not k.endswith("(final epoch)")}
    assert set(selected) == {f"sym-50 / {n}" for n in CORE} | {runs.CLEAN_CE}
    assert set(outcome.methods) == set(selected) | {f"{k} (final epoch)" for k in selected}
    for values in outcome.methods.values():
        assert len(values) == 1 and 0.1 < values[0] <= 1.0
    # the parts are the protocol's, in its order, with its declared expected effects
    _check_declared("noisy-labels", study.PROTOCOL_QUICK, outcome.parts)
    assert [p.name for p in outcome.parts] == PARTS
    mean = {k: v[0] for k, v in outcome.methods.items()}
    parts = {p.name: p for p in outcome.parts}
    assert parts[study.PART_FL].margin == pytest.approx(mean["sym-50 / RENT"] - mean["sym-50 / FL"])
    assert parts[study.PART_CE].margin == pytest.approx(mean["sym-50 / RENT"] - mean["sym-50 / CE"])
    want = all(mean["sym-50 / RENT"] > mean[f"sym-50 / {o}"] for o in ("FL", "RW", "CE"))
    assert outcome.holds == (want and outcome.baseline.healthy)
    finals = {p["name"]: p for p in outcome.details["final_epoch_parts"]}
    assert finals[study.PART_RW]["margin"] == pytest.approx(
        mean["sym-50 / RENT (final epoch)"] - mean["sym-50 / RW (final epoch)"])
    assert abs(outcome.details["observed_noise_rate"]["sym-50"][0] - 0.5) < 0.06
    sel = outcome.details["weight_decay_selection"]
    assert sel["chosen"] in (0.0, 1e-3) and sel["selection_seeds"] == 1 and sel["stability"] is None
    curves = outcome.details["curves_mean"]["sym-50 / RENT"]
    assert len(curves["test"]) == len(curves["val"]) == study.CONFIGS["smoke"].epochs
    assert all((tmp_path / p).stat().st_size > 1000 for p in outcome.plots)
    assert "outperforms the existing ways" in outcome.summary and "final epoch" in outcome.summary


def test_without_cleanlab_the_study_names_what_it_left_out(tmp_path, monkeypatch):
    import reweighting.noisy_labels.cleanlab_estimate as ce

    monkeypatch.setattr(ce, "cleanlab_available", lambda: False)
    outcome = _smoke(tmp_path)
    assert set(outcome.details["T_error"]["sym-50"]) == {"anchor", "dualt"}
    assert len(outcome.left_out) == 1 and "cleanlab" in outcome.left_out[0]
    assert "cleanlab is not installed" in outcome.summary


def test_the_selected_epoch_is_the_first_best_on_the_noisy_validation_split():
    assert runs.selected_epoch([0.1, 0.5, 0.3, 0.5]) == 1
    assert runs.selected_epoch([0.4]) == 0
    assert runs.selected_epoch([0.2, 0.3, 0.31]) == 2
    with pytest.raises(ValueError, match="no epochs"):
        runs.selected_epoch([])


def test_a_job_reports_the_selected_and_the_final_epoch_of_curves_from_scratch():
    config = study.CONFIGS["smoke"]
    out = runs.run_job(config, 3, 0.0, "sym-50")
    for run in out["runs"].values():
        assert len(run["test"]) == len(run["val"]) == config.epochs
        assert run["val"][run["epoch"] - 1] == max(run["val"])
        assert run["selected"] == run["test"][run["epoch"] - 1] and run["final"] == run["test"][-1]
    # the warm-up checkpoint is the CE run after estimate_epoch epochs, a model of its own (from scratch)
    assert out["warmup_accuracy"] == pytest.approx(out["runs"]["CE"]["test"][config.estimate_epoch - 1])
    clean = runs.run_job(config, 3, 0.0, runs.CLEAN)
    assert set(clean["runs"]) == {runs.CLEAN_CE} and clean["observed_noise"] == 0.0
    # the same job gives the same numbers (seeded), and a pool of workers gives them too
    assert runs.run_job(config, 3, 0.0, "sym-50")["runs"]["RENT"] == out["runs"]["RENT"]
    with runs.job_pool(2) as pool:
        pooled = runs.run_jobs(config, [(3, 0.0, "sym-50"), (3, 0.0, runs.CLEAN)], pool)
    assert pooled[(3, 0.0, "sym-50")]["runs"] == out["runs"]


def test_each_seed_redraws_split_noise_and_validation_and_settings_draw_their_own_noise():
    x0, y0, _, _ = runs.digits_split(0, 0.3)
    x1, y1, _, _ = runs.digits_split(1, 0.3)
    assert not torch.equal(x0, x1)
    a, _ = runs.noisy_labels(y0, "sym-50", 0)
    b, _ = runs.noisy_labels(y0, "sym-50", 1)
    c, _ = runs.noisy_labels(y0, "sym-20", 0)
    assert not torch.equal(a, b)
    assert torch.equal(a, runs.noisy_labels(y0, "sym-50", 0)[0])
    # the two symmetric settings of one seed do not reuse one uniform draw
    flipped_50, flipped_20 = a != y0, c != y0
    assert not bool((flipped_20 & ~flipped_50).sum() == 0)
    m0, m1 = runs.validation_mask(100, 0.2, 0), runs.validation_mask(100, 0.2, 1)
    assert int(m0.sum()) == 20 and not torch.equal(m0, m1)
    # each seed its own initialisation
    config = study.CONFIGS["smoke"]
    w0 = runs._fresh_model(config, 0, 0.0)[0].net[0].weight
    assert not torch.equal(w0, runs._fresh_model(config, 1, 0.0)[0].net[0].weight)
    assert torch.equal(w0, runs._fresh_model(config, 0, 0.0)[0].net[0].weight)


def test_the_validation_split_carries_the_training_noise_and_the_test_split_does_not():
    config = study.CONFIGS["smoke"]
    data, true_T, observed = runs._setting_data(config, 0, "sym-50")
    x_pool, y_pool, x_te, y_te = runs.digits_split(0, config.test_fraction)
    held = runs.validation_mask(x_pool.shape[0], config.val_fraction, 0)
    assert torch.equal(data["x_val"], x_pool[held]) and torch.equal(data["y_te"], y_te)
    val_noise = float((data["y_val"] != y_pool[held]).float().mean())
    fit_noise = float((data["y_fit"] != y_pool[~held]).float().mean())
    assert abs(val_noise - 0.5) < 0.1 and abs(fit_noise - 0.5) < 0.06 and abs(observed - 0.5) < 0.06
    assert data["x_fit"].shape[0] + data["x_val"].shape[0] == x_pool.shape[0]
    clean, none, zero = runs._setting_data(config, 0, runs.CLEAN)
    assert none is None and zero == 0.0 and torch.equal(clean["y_val"], y_pool[held])


def _methods(rent, fl, rw, ce):
    """Two settings x three seeds: per setting a list over seeds."""
    return {f"{noise} / {name}": values[k] for name, values in
            (("RENT", rent), ("FL", fl), ("RW", rw), ("CE", ce)) for k, noise in enumerate(("sym-20", "sym-50"))}


def test_settings_are_averaged_per_seed_not_pooled_as_independent_pairs():
    rent = ([0.90, 0.92, 0.94], [0.80, 0.84, 0.82])
    fl = ([0.89, 0.90, 0.95], [0.78, 0.80, 0.83])
    methods = _methods(rent, fl, fl, fl)
    parts = {p.name: p for p in study.claim_parts(methods, ["sym-20", "sym-50"])}
    part = parts[study.PART_FL]
    per_seed = [((rent[0][i] + rent[1][i]) - (fl[0][i] + fl[1][i])) / 2 for i in range(3)]
    assert part.n == 3
    assert part.margin == pytest.approx(sum(per_seed) / 3)
    from reweighting.studies.stats import compare

    assert part.noise == pytest.approx(compare("x", per_seed, [0.0] * 3).noise)
    # RENT vs CE is decided at symmetric 50% alone
    ce_part = parts[study.PART_CE]
    assert ce_part.margin == pytest.approx(sum(r - c for r, c in zip(rent[1], fl[1])) / 3)
    assert [p.expected for p in parts.values()] == [study.EXPECTED[n] for n in parts]


def _fake_results(val_by_wd, seeds=(1000, 1001)):
    results = {}
    for wd, per_seed in val_by_wd.items():
        for seed, v in zip(seeds, per_seed):
            run = {"val": [v - 0.1, v, v - 0.2], "epoch": 2}
            # a diagnostic run far better under one candidate only: it must not move the choice
            true_t = {"val": [0.99 if wd == 1e-4 else 0.0], "epoch": 1}
            results[(seed, wd, "sym-50")] = {"runs": {"CE": run, "RENT": run, "RENT (true T)": true_t}}
    return results


def test_weight_decay_selection_on_noisy_validation_with_a_preferred_default():
    seeds = [1000, 1001]
    # 1e-3 clearly best on the validation accuracy at the selected epoch
    res = _fake_results({0.0: [0.5, 0.52], 1e-4: [0.5, 0.5], 1e-3: [0.6, 0.62]})
    sel = study.choose_weight_decay(res, seeds, ["sym-50"], candidates=(0.0, 1e-4, 1e-3))
    assert sel.chosen == 1e-3 and sel.scores["0.001"] == pytest.approx(0.61) and sel.stability == 1.0
    # within the tolerance, the preferred value is kept
    res = _fake_results({0.0: [0.503, 0.503], 1e-4: [0.5, 0.5], 1e-3: [0.49, 0.49]})
    assert study.choose_weight_decay(res, seeds, ["sym-50"], (0.0, 1e-4, 1e-3)).chosen == study.PREFERRED_WEIGHT_DECAY
    # beyond it, not: the true-T diagnostics (0.99) play no part
    res = _fake_results({0.0: [0.51, 0.51], 1e-4: [0.5, 0.5], 1e-3: [0.49, 0.49]})
    assert study.choose_weight_decay(res, seeds, ["sym-50"], (0.0, 1e-4, 1e-3)).chosen == 0.0


def test_protocol_is_declared_fingerprinted_and_lists_its_deviations():
    full, quick = study.PROTOCOL_FULL, study.PROTOCOL_QUICK
    assert [p.name for p in full.parts] == PARTS == [p.name for p in quick.parts]
    assert full.seeds == study.STUDY.seeds and full.selection_seeds >= 2
    assert full.fingerprint() == study._protocol(False).fingerprint() != quick.fingerprint()
    assert any("digits" in d for d, _ in full.deviations)
    assert study.STUDY.protocol(False) is full and study.STUDY.protocol(True) is quick


def _warmup_accuracy(epochs: int) -> float:
    """Clean test accuracy of the study's MLP after ``epochs`` of cross-entropy on 50%-noisy digits."""
    from reweighting.noisy_labels import train_epochs

    x_tr, y_tr, x_te, y_te = study.digits_split(0, 0.3)
    noisy, _ = study.noisy_labels(y_tr, "sym-50", 0)
    torch.manual_seed(0)
    model = study.MLP(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_epochs(model, study.Batches(x_tr, noisy, 128, shuffle=True), optimizer, epochs, loss="ce",
                 show_progress=False)
    return runs.accuracy(model, x_te, y_te)


def test_baseline_health_check_on_a_broken_and_a_healthy_model():
    broken, healthy = _warmup_accuracy(0), _warmup_accuracy(8)
    assert not study.baseline_health({"sym-50": [broken]}).healthy
    assert study.baseline_health({"sym-50": [healthy]}).healthy
    # the worst setting decides
    assert not study.baseline_health({"sym-20": [healthy], "sym-50": [broken]}).healthy
