"""Study ``noisy-labels``: RENT against forward correction, reweighting, DWS and CE on noisy digits.

Bae et al. (ICLR 2024) claim that resampling by the transition-matrix importance weights (RENT)
outperforms the existing ways of using a transition matrix, forward loss correction (FL) and
reweighting (RW) among them, and that it beats plain cross-entropy under heavy noise. Here:
scikit-learn's bundled 8x8 digits (1797 real images, nothing downloaded), a small MLP, symmetric
20% / 50% and pair 20% / 40% label noise on the training split, clean test accuracy after the
final epoch. Every method continues from one shared cross-entropy warm-up per seed, with ``T``
estimated from that warm-up by anchor points (the paper's "Forward") and, separately, the true ``T``.

The verdict is on the whole claim: RENT must beat FL and RW (paired by seed, pooled over the noise
settings) and CE at symmetric 50%; each is a part with its margin and noise, and the per-setting
comparisons are reported beside them. The warm-up model must first learn the task (its clean test
accuracy against a bar), or the comparison is inconclusive.

Peer: cleanlab (optional). Its noise-matrix estimate from the same warm-up posteriors
(:func:`~reweighting.noisy_labels.cleanlab_estimate.cleanlab_transition`) is compared to ours by
the error to the true ``T`` and used by an extra row, RENT with cleanlab's T; ``CleanLearning``
wrapped around the same MLP trained with cross-entropy is a peer row. Without cleanlab those rows
are left out and the report says so.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from . import Baseline, Study, StudyContext, StudyOutcome, check_baseline, compare, decide

NOISES = {"sym-20": ("symmetric", 0.2), "sym-50": ("symmetric", 0.5),
          "pair-20": ("pair", 0.2), "pair-40": ("pair", 0.4)}
LOSS_OF = {"FL": "forward", "RW": "reweight", "DWS": "dws", "RENT": "rent"}
CLEANLEARNING = "CleanLearning (cleanlab)"
CLEANLAB_ROWS = ("RENT (cleanlab T)", CLEANLEARNING)

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"noises": list(NOISES), "hidden": 128, "lr": 1e-3, "batch_size": 64, "warmup_epochs": 10,
             "epochs": 40, "dws_alpha": 10.0, "quantile": 0.97, "test_fraction": 0.3, "cleanlab_folds": 3},
    "quick": {"noises": list(NOISES), "hidden": 128, "lr": 1e-3, "batch_size": 64, "warmup_epochs": 10,
              "epochs": 25, "dws_alpha": 10.0, "quantile": 0.97, "test_fraction": 0.3, "cleanlab_folds": 2},
    # For the test suite: the real code path on a fraction of the work.
    "smoke": {"noises": ["sym-50"], "hidden": 32, "lr": 1e-2, "batch_size": 128, "warmup_epochs": 3,
              "epochs": 3, "dws_alpha": 10.0, "quantile": 0.97, "test_fraction": 0.3, "cleanlab_folds": 2},
}


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU: the classifier every method trains."""

    def __init__(self, hidden: int, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Batches:
    """Mini-batches of in-memory tensors, reshuffled on every pass by a seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)


def digits_split(seed: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scikit-learn's digits, pixels scaled to [0, 1], split stratified by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data / 16.0, data.target, test_size=test_fraction,
                                              random_state=seed, stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def noisy_train_labels(clean: torch.Tensor, noise: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the training labels for setting ``noise``; returns ``(noisy, true_T)``."""
    from reweighting.noisy_labels import pair_noise, symmetric_noise

    kind, rate = NOISES[noise]
    generator = torch.Generator().manual_seed(10_000 * seed + list(NOISES).index(noise))
    if kind == "symmetric":
        return symmetric_noise(clean, rate, 10, generator=generator)
    return pair_noise(clean, rate, 10, generator=generator)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _torch_classifier_class():
    from sklearn.base import BaseEstimator, ClassifierMixin

    class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
        """The study's MLP trained with cross-entropy, behind scikit-learn's API (for CleanLearning)."""

        def __init__(self, hidden: int = 128, lr: float = 1e-3, batch_size: int = 64, epochs: int = 50,
                     seed: int = 0) -> None:
            self.hidden, self.lr, self.batch_size, self.epochs, self.seed = hidden, lr, batch_size, epochs, seed

        def fit(self, X, y, sample_weight=None):
            from reweighting.noisy_labels import train_epochs

            torch.manual_seed(self.seed)
            self.classes_ = torch.arange(10).numpy()
            self.model_ = MLP(self.hidden)
            optimizer = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
            loader = Batches(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long),
                             self.batch_size, shuffle=True, seed=self.seed)
            train_epochs(self.model_, loader, optimizer, self.epochs, loss="ce", show_progress=False)
            return self

        def predict_proba(self, X):
            self.model_.eval()
            with torch.no_grad():
                return torch.softmax(self.model_(torch.as_tensor(X, dtype=torch.float32)), 1).numpy()

        def predict(self, X):
            return self.predict_proba(X).argmax(1)

    return TorchMLPClassifier


# The warm-up model (cross-entropy on the noisy labels) must reach this clean test accuracy in every
# noise setting (chance is 0.1): below it, the methods would continue from a model that has not
# learned the digits and their differences would say nothing about how they use T.
HEALTHY_WARMUP_ACCURACY = 0.6


def baseline_health(warmup_accuracy: dict[str, list[float]], bar: float = HEALTHY_WARMUP_ACCURACY) -> Baseline:
    """The health check: the lowest per-setting mean clean test accuracy of the warm-up model against ``bar``."""
    worst = min(_mean(values) for values in warmup_accuracy.values())
    return check_baseline("warm-up model's clean test accuracy (lowest noise-setting mean)", worst, bar)


def run_setting(noise: str, seed: int, config: dict[str, Any], use_cleanlab: bool | None = None,
                ctx: StudyContext | None = None) -> dict[str, Any]:
    """One noise setting and seed: every method's final clean test accuracy and the T estimates' errors.

    ``use_cleanlab`` None: the cleanlab rows run when cleanlab is installed. With ``ctx``, a progress
    bar over the methods (each is seconds to a minute on a shared CPU).
    """
    from reweighting.noisy_labels import estimate_transition, predict_probs, train_epochs, transition_error
    from reweighting.noisy_labels.cleanlab_estimate import cleanlab_available, cleanlab_transition

    if use_cleanlab is None:
        use_cleanlab = cleanlab_available()

    x_tr, y_clean, x_te, y_te = digits_split(seed, config["test_fraction"])
    y_noisy, true_T = noisy_train_labels(y_clean, noise, seed)
    torch.manual_seed(seed)
    model = MLP(config["hidden"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loader = Batches(x_tr, y_noisy, config["batch_size"], shuffle=True, seed=seed)
    train_epochs(model, loader, optimizer, config["warmup_epochs"], loss="ce", phase="warm-up", show_progress=False)
    warmup_accuracy = accuracy(model, x_te, y_te)

    probs, labels = predict_probs(model, Batches(x_tr, y_noisy, 512, shuffle=False))
    estimates = {"anchor": estimate_transition(probs, labels, "anchor", config["quantile"]),
                 "dualt": estimate_transition(probs, labels, "dualt", config["quantile"])}
    if use_cleanlab:
        estimates["cleanlab"] = cleanlab_transition(probs, labels)
    errors = {name: transition_error(T, true_T) for name, T in estimates.items()}

    start_model, start_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    accuracies = {}
    runs = [("CE", "ce", None)]
    runs += [(name, loss, estimates["anchor"]) for name, loss in LOSS_OF.items()]
    runs += [(f"{name} (true T)", loss, true_T) for name, loss in LOSS_OF.items()]
    if use_cleanlab:
        runs.append(("RENT (cleanlab T)", "rent", estimates["cleanlab"]))
    steps = ctx.progress(runs, desc=f"{noise}, seed {seed}: methods") if ctx is not None else runs
    for name, loss, T in steps:
        model.load_state_dict(start_model)
        optimizer.load_state_dict(start_optimizer)
        loader.generator.manual_seed(seed)
        options = {"alpha": config["dws_alpha"]} if loss == "dws" else {}
        draws = torch.Generator().manual_seed(seed)
        train_epochs(model, loader, optimizer, config["epochs"], loss=loss, transition=T, loss_options=options,
                     generator=draws, show_progress=False)
        accuracies[name] = accuracy(model, x_te, y_te)

    if use_cleanlab:
        # Peer: cleanlab's CleanLearning around the same MLP trained with CE for the same number of epochs.
        from cleanlab.classification import CleanLearning

        classifier = _torch_classifier_class()(hidden=config["hidden"], lr=config["lr"],
                                               batch_size=config["batch_size"],
                                               epochs=config["warmup_epochs"] + config["epochs"], seed=seed)
        peer = CleanLearning(classifier, seed=seed, cv_n_folds=config["cleanlab_folds"])
        peer.fit(x_tr.numpy(), y_noisy.numpy())
        predicted = torch.as_tensor(peer.predict(x_te.numpy()))
        accuracies[CLEANLEARNING] = float((predicted == y_te).float().mean())
    return {"accuracy": accuracies, "T_error": errors, "warmup_accuracy": warmup_accuracy,
            "observed_noise": float((y_noisy != y_clean).float().mean())}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _plot(methods: dict[str, list[float]], noises: list[str], names: list[str], path) -> str:
    from .report import new_figure, save_figure

    fig, ax = new_figure(max(6.0, 1.9 * len(noises) + 2), 4.2)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        means, stds = [], []
        for noise in noises:
            values = methods[f"{noise} / {name}"]
            means.append(100 * _mean(values))
            stds.append(100 * (torch.tensor(values).std().item() if len(values) > 1 else 0.0))
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(noises))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(range(len(noises)))
    ax.set_xticklabels(noises)
    low = min(100 * min(v) for v in methods.values())
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("clean test accuracy (%), final epoch")
    ax.set_title("noisy digits: T estimated by anchor points")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    return save_figure(fig, path)


def claim_parts(methods: dict[str, list[float]], noises: list[str]):
    """The claim's parts: RENT vs FL and vs RW, paired by (setting, seed) and pooled over the settings,
    and RENT vs CE at symmetric 50% noise (when that setting ran)."""
    def pooled(name: str) -> list[float]:
        return [v for noise in noises for v in methods[f"{noise} / {name}"]]

    parts = [compare(f"RENT > {other} (estimated T, all settings pooled)", pooled("RENT"), pooled(other))
             for other in ("FL", "RW")]
    if "sym-50" in noises:
        parts.append(compare("RENT > CE at symmetric 50%", methods["sym-50 / RENT"], methods["sym-50 / CE"]))
    return parts


def run(ctx: StudyContext, config: dict[str, Any] | None = None, use_cleanlab: bool | None = None) -> StudyOutcome:
    from reweighting.noisy_labels.cleanlab_estimate import cleanlab_available

    if config is None:
        config = CONFIGS["quick" if ctx.quick else "full"]
    if use_cleanlab is None:
        use_cleanlab = cleanlab_available()
    left_out = [] if use_cleanlab else [
        f"{', '.join(CLEANLAB_ROWS)} and cleanlab's T estimate: cleanlab is not installed "
        "(pip install 'cleanlab>=2.6', part of the 'studies' extra)"]
    noises = list(config["noises"])
    methods: dict[str, list[float]] = {}
    errors: dict[str, dict[str, list[float]]] = {noise: {} for noise in noises}
    observed: dict[str, list[float]] = {noise: [] for noise in noises}
    warmup: dict[str, list[float]] = {noise: [] for noise in noises}
    jobs = [(noise, seed) for noise in noises for seed in ctx.seeds]
    for noise, seed in ctx.progress(jobs, desc="noisy-labels (setting x seed)"):
        result = run_setting(noise, seed, config, use_cleanlab, ctx)
        for name, value in result["accuracy"].items():
            methods.setdefault(f"{noise} / {name}", []).append(value)
        for name, value in result["T_error"].items():
            errors[noise].setdefault(name, []).append(value)
        observed[noise].append(result["observed_noise"])
        warmup[noise].append(result["warmup_accuracy"])

    mean = {name: _mean(values) for name, values in methods.items()}
    baseline = baseline_health(warmup)
    parts = claim_parts(methods, noises)
    verdict = decide(parts, baseline)
    per_setting = {noise: {other: compare(f"RENT > {other} at {noise}", methods[f"{noise} / RENT"],
                                          methods[f"{noise} / {other}"]).as_dict()
                           for other in ("FL", "RW", "DWS", "CE")} for noise in noises}

    rows = ["CE", "FL", "RW", "DWS", "RENT", "RENT (true T)", "FL (true T)"]
    rows += [r for r in CLEANLAB_ROWS if use_cleanlab]
    lines = [
        "Claim as the paper states it: RENT outperforms the existing ways of using T (forward correction FL "
        "and reweighting RW here) and beats CE under heavy noise. Parts (paired by seed; margin in accuracy, "
        "positive favours RENT; noise = half-width of the paired 95% t-interval):", "",
        "| part | verdict | margin (points) | noise (points) | pairs |", "|---|---|---|---|---|"]
    for part in parts:
        noise_text = f"{100 * part.noise:.2f}" if part.noise is not None else "n/a"
        lines.append(f"| {part.name} | {part.verdict} | {100 * part.margin:+.2f} | {noise_text} | {part.n} |")
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the whole claim: **{verdict}**.", "",
              "Per setting, RENT minus each method (points, mean ± noise over seeds; RENT ahead in k of n seeds):", "",
              "| noise | vs FL | vs RW | vs DWS | vs CE |", "|---|---|---|---|---|"]
    for noise in noises:
        cells = []
        for other in ("FL", "RW", "DWS", "CE"):
            d = per_setting[noise][other]
            diffs = [a - b for a, b in zip(methods[f"{noise} / RENT"], methods[f"{noise} / {other}"])]
            noise_text = f" ± {100 * d['noise']:.1f}" if d["noise"] is not None else ""
            cells.append(f"{100 * d['margin']:+.1f}{noise_text} ({sum(x > 0 for x in diffs)}/{len(diffs)})")
        lines.append(f"| {noise} | " + " | ".join(cells) + " |")
    lines += ["", "| noise | warm-up | " + " | ".join(rows) + " |", "|---" * (len(rows) + 2) + "|"]
    for noise in noises:
        cells = [f"{100 * mean[f'{noise} / {n}']:.1f}" for n in rows]
        lines.append(f"| {noise} | {100 * _mean(warmup[noise]):.1f} | " + " | ".join(cells) + " |")
    estimators = ["anchor", "dualt"] + (["cleanlab"] if use_cleanlab else [])
    lines += ["", "Error of the estimated T to the true T, sum|T_hat - T| / sum|T| (mean over seeds; same warm-up "
              "posteriors for all):", "", "| noise | " + " | ".join(estimators) + " |", "|---" * (len(estimators) + 1)
              + "|"]
    for noise in noises:
        lines.append(f"| {noise} | " + " | ".join(f"{_mean(errors[noise][e]):.3f}" for e in estimators) + " |")
    fl_parts = [p for p in parts if "FL" in p.name]
    if any(p.verdict != "holds" for p in fl_parts):
        fl_true = [100 * (mean[f"{n} / FL (true T)"] - mean[f"{n} / RENT (true T)"]) for n in noises]
        lines += ["", "RENT vs FL: with the true T, FL minus RENT is "
                  + ", ".join(f"{n} {d:+.1f}" for n, d in zip(noises, fl_true))
                  + " points; where that is positive too, FL's lead does not come from the estimated T. Forward "
                  "correction trains on every sample of a batch through T, while RENT trains on a weighted "
                  "resample of it (sampling noise that RENT's paper argues regularises; here, on a small and "
                  "nearly separable data set, that may not pay: this study does not isolate the cause)."]
    if left_out:
        lines += ["", "Left out: " + "; ".join(left_out) + "."]

    plot = _plot(methods, noises, ["CE", "FL", "RW", "DWS", "RENT"] + ([CLEANLEARNING] if use_cleanlab else []),
                 ctx.out_dir / "accuracy.png")
    return StudyOutcome(
        methods=methods,
        holds=verdict == "holds",
        config={**config, "dataset": "sklearn digits (8x8, 1797 images)", "model": "MLP 64-h-h-10",
                "optimizer": "Adam", "T_estimator": "anchor (Forward)", "cleanlab": use_cleanlab,
                "healthy_warmup_accuracy": HEALTHY_WARMUP_ACCURACY,
                # The MLP and the 1797 images are too small to gain from a GPU; the study stays on the CPU.
                "device": "cpu"},
        summary="\n".join(lines),
        details={"per_setting": per_setting, "warmup_accuracy": warmup, "T_error": errors,
                 "observed_noise_rate": observed},
        plots=[plot],
        parts=parts,
        baseline=baseline,
        left_out=left_out,
    )


STUDY = Study(
    name="noisy-labels",
    claim="Resampling by transition-matrix importance weights (RENT) outperforms the existing ways of using "
          "the transition matrix, forward correction (FL) and reweighting (RW), and beats cross-entropy at 50% "
          "symmetric noise (Bae et al., ICLR 2024).",
    metric="clean test accuracy",
    lower_is_better=False,
    run=run,
    seeds=5,
    quick_seeds=2,
    description="RENT, DWS, RW, forward correction and CE on noisy sklearn digits, with cleanlab as a peer",
    threads=1,
    cost=383,
)
