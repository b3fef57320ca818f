"""The training runs of the ``noisy-labels`` study: data, model, one (seed, noise setting) job.

A job trains every method from the same fresh initialisation of one seed on one noise setting and
records, after every epoch, the clean test accuracy and the accuracy on a validation split whose
labels carry the same noise as the training labels. The epoch a method reports is the one with the
best noisy-validation accuracy (the first such epoch); its final epoch is kept beside it.

``T`` is estimated (anchor points) from the cross-entropy run's own model after ``estimate_epoch``
epochs: that checkpoint is the warm-up model the estimator needs; every transition-aware method
then trains from scratch with that ``T``. Each seed redraws the train/validation/test split, the
initialisation, the data order, the resampling draws and (per setting) the label-noise draw.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .protocol import perturb_initial_weights

NOISES = {"sym-20": ("symmetric", 0.2), "sym-50": ("symmetric", 0.5),
          "pair-20": ("pair", 0.2), "pair-40": ("pair", 0.4)}
CLEAN = "clean"
LOSS_OF = {"CE": "ce", "FL": "forward", "RW": "reweight", "DWS": "dws", "RENT": "rent"}
CLEAN_CE = "CE (clean labels)"


@dataclass(frozen=True)
class Config:
    """One run's settings (the weight decay is chosen on the selection seeds, so it is an argument)."""

    hidden: int = 128
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 30
    estimate_epoch: int = 10
    dws_alpha: float = 10.0
    quantile: float = 0.97
    test_fraction: float = 0.3
    val_fraction: float = 0.2
    noises: tuple[str, ...] = tuple(NOISES)
    methods: tuple[str, ...] = tuple(LOSS_OF)
    true_t: tuple[str, ...] = ("FL", "RENT")
    # cleanlab's noise-matrix estimate as a peer of the anchor estimate (None: when cleanlab is installed)
    cleanlab: bool | None = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.noises if n not in NOISES]
        if unknown:
            raise ValueError(f"Config.noises: unknown settings {unknown}; known: {list(NOISES)}")
        if not 1 <= self.estimate_epoch <= self.epochs:
            raise ValueError(f"Config.estimate_epoch must be in 1..epochs={self.epochs}, got {self.estimate_epoch}")
        if "CE" not in self.methods or any(m not in LOSS_OF for m in self.methods + self.true_t):
            raise ValueError(f"Config.methods must include CE and name only {list(LOSS_OF)}: {self.methods}, "
                             f"true_t {self.true_t}")


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
    """Scikit-learn's digits, pixels scaled to [0, 1], split into a pool and a test set, stratified by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data / 16.0, data.target, test_size=test_fraction,
                                              random_state=seed, stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def noisy_labels(clean: torch.Tensor, noise: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt ``clean`` for setting ``noise`` with a draw of its own per (seed, setting); ``(noisy, true_T)``."""
    from reweighting.noisy_labels import pair_noise, symmetric_noise

    kind, rate = NOISES[noise]
    generator = torch.Generator().manual_seed(10_000 * seed + 1 + list(NOISES).index(noise))
    if kind == "symmetric":
        return symmetric_noise(clean, rate, 10, generator=generator)
    return pair_noise(clean, rate, 10, generator=generator)


def validation_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """A random ``fraction`` of ``n`` pool samples (drawn by ``seed``) held out for model selection."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 * seed + 7))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: round(fraction * n)]] = True
    return mask


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def selected_epoch(validation: list[float]) -> int:
    """The index of the first epoch with the highest validation accuracy."""
    if not validation:
        raise ValueError("selected_epoch: no epochs to choose from")
    return max(range(len(validation)), key=lambda i: (validation[i], -i))


def _fresh_model(config: Config, seed: int, weight_decay: float) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = perturb_initial_weights(MLP(config.hidden))
    return model, torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=weight_decay)


def _train(config: Config, seed: int, weight_decay: float, data: dict, loss: str, T: torch.Tensor | None,
           stop_at: int | None = None) -> tuple[dict[str, Any], MLP | None]:
    """Train one method from scratch; its curves, and the model after ``stop_at`` epochs when asked."""
    from reweighting.noisy_labels import train_epochs

    model, optimizer = _fresh_model(config, seed, weight_decay)
    loader = Batches(data["x_fit"], data["y_fit"], config.batch_size, shuffle=True, seed=seed)
    draws = torch.Generator().manual_seed(seed)
    options = {"alpha": config.dws_alpha} if loss == "dws" else {}
    evaluate = lambda m: {"val": accuracy(m, data["x_val"], data["y_val"]),  # noqa: E731
                          "test": accuracy(m, data["x_te"], data["y_te"])}
    history, snapshot = [], None
    first = config.epochs if stop_at is None else stop_at
    history += train_epochs(model, loader, optimizer, first, loss=loss, transition=T, loss_options=options,
                            generator=draws, evaluate=evaluate, show_progress=False, num_classes=10)
    if stop_at is not None:
        import copy

        snapshot = copy.deepcopy(model)
        if config.epochs > stop_at:
            history += train_epochs(model, loader, optimizer, config.epochs - stop_at, loss=loss, transition=T,
                                    loss_options=options, generator=draws, evaluate=evaluate,
                                    show_progress=False, num_classes=10)
    val, test = [h["val"] for h in history], [h["test"] for h in history]
    best = selected_epoch(val)
    return {"val": val, "test": test, "epoch": best + 1, "selected": test[best], "final": test[-1]}, snapshot


def _setting_data(config: Config, seed: int, noise: str) -> tuple[dict, torch.Tensor | None, float]:
    x_pool, y_pool, x_te, y_te = digits_split(seed, config.test_fraction)
    if noise == CLEAN:
        y_obs, true_T = y_pool, None
    else:
        y_obs, true_T = noisy_labels(y_pool, noise, seed)
    held = validation_mask(x_pool.shape[0], config.val_fraction, seed)
    data = {"x_fit": x_pool[~held], "y_fit": y_obs[~held], "x_val": x_pool[held], "y_val": y_obs[held],
            "x_te": x_te, "y_te": y_te}
    return data, true_T, float((y_obs != y_pool).float().mean())


def run_job(config: Config, seed: int, weight_decay: float, noise: str) -> dict[str, Any]:
    """Every method on one seed and noise setting (``"clean"``: cross-entropy on the clean labels only).

    Returns ``{"runs": {method: {"val", "test", "epoch", "selected", "final"}}, "warmup_accuracy",
    "T_error": {estimator: error}, "observed_noise"}``.
    """
    from reweighting.checks import checks

    # The study's inputs are built here and well-formed; the per-batch value checks (a host read each)
    # cost a fifth of the run, so they are off while it trains.
    with checks(False):
        return _run_job(config, seed, weight_decay, noise)


def _run_job(config: Config, seed: int, weight_decay: float, noise: str) -> dict[str, Any]:
    from reweighting.noisy_labels import estimate_transition, predict_probs, transition_error

    data, true_T, observed = _setting_data(config, seed, noise)
    if noise == CLEAN:
        run, _ = _train(config, seed, weight_decay, data, "ce", None)
        return {"runs": {CLEAN_CE: run}, "observed_noise": observed}
    runs = {}
    runs["CE"], warm = _train(config, seed, weight_decay, data, "ce", None, stop_at=config.estimate_epoch)
    probs, labels = predict_probs(warm, Batches(data["x_fit"], data["y_fit"], 512, shuffle=False))
    estimates = {"anchor": estimate_transition(probs, labels, "anchor", config.quantile),
                 "dualt": estimate_transition(probs, labels, "dualt", config.quantile)}
    from reweighting.noisy_labels.cleanlab_estimate import cleanlab_available, cleanlab_transition

    if config.cleanlab or (config.cleanlab is None and cleanlab_available()):
        estimates["cleanlab"] = cleanlab_transition(probs, labels)
    for method in config.methods:
        if method != "CE":
            runs[method], _ = _train(config, seed, weight_decay, data, LOSS_OF[method], estimates["anchor"])
    for method in config.true_t:
        if method != "CE":
            runs[f"{method} (true T)"], _ = _train(config, seed, weight_decay, data, LOSS_OF[method], true_T)
    return {"runs": runs, "warmup_accuracy": accuracy(warm, data["x_te"], data["y_te"]),
            "T_error": {name: transition_error(T, true_T) for name, T in estimates.items()},
            "observed_noise": observed}


def _init_worker() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def job_pool(workers: int):
    """A pool of ``workers`` single-threaded processes for :func:`run_jobs` (None for one worker: run here)."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker) as pool:
        yield pool


def run_jobs(config: Config, jobs: list[tuple[int, float, str]], pool=None, progress=None) -> dict:
    """``{(seed, weight_decay, noise): run_job(...)}`` for every job, in ``pool`` (see :func:`job_pool`)
    when given (``progress(iterable, desc, total)`` wraps the loop, e.g. a progress bar)."""
    wrap = progress or (lambda it, desc, total: it)
    if pool is None:
        return {job: run_job(config, *job) for job in wrap(jobs, "noisy-labels jobs", len(jobs))}
    from concurrent.futures import as_completed

    futures = {pool.submit(run_job, config, *job): job for job in jobs}
    return {futures[f]: f.result() for f in wrap(as_completed(futures), "noisy-labels jobs", len(futures))}
