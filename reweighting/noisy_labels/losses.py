"""Losses for learning from noisy labels with a transition matrix ``T[noisy, clean]`` (docs/methods/noisy-labels.md).

All take the classifier's ``logits`` (its clean-label posterior is ``f = softmax(logits)``), the
observed noisy ``labels`` and ``T``, and return a scalar to call ``backward`` on:

- :func:`forward_loss` (FL): ``NLL(T @ f(x), y)``, the likelihood of the observed labels;
- :func:`backward_loss`: ``sum_k (T^-1)[k, y] CE(f, k)``, unbiased for the clean loss;
- :func:`reweight_loss` (RW): ``sum_i mu_i CE_i`` with ``mu = w / sum w`` (:func:`importance_weights`);
- :func:`dws_loss` (DWS): ``mean_m sum_i pi^(m)_i CE_i`` with ``pi^(m) ~ Dirichlet(alpha mu)``;
- :func:`rent_loss` (RENT): ``mean_k CE_{idx_k}`` with ``idx ~ Categorical(mu)``, ``N B`` draws.

The weights are detached and float32. Under ``torch.distributed`` the normalisation of ``w``, the
Dirichlet draws and the resampling are over the **global** batch (pass every rank a generator in the
same state), and the returned value is scaled so that DDP's gradient averaging gives exactly the
gradient of one process holding the whole batch (see :func:`reweighting.weighted_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..checks import check_choice, check_count, check_positive_number, checks_enabled, describe_indices
from ..reduce import weighted_loss
from ..resample import dirichlet_weights, resample_counts
from .transition import _check_labels, check_transition

__all__ = [
    "importance_weights",
    "forward_loss",
    "backward_loss",
    "reweight_loss",
    "dws_loss",
    "rent_loss",
    "LOSSES",
    "noisy_label_loss",
]

LOSSES = ("ce", "forward", "backward", "reweight", "dws", "rent")


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, check: bool = True,
                         probability_check: bool = True) -> None:
    """Types and shapes always; label range, finiteness and the probabilities-for-logits mistake when checks are on."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor [batch, classes], got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor [batch] of class indices, got {type(labels).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (raw scores), got dtype {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [batch] matching logits {tuple(logits.shape)}, "
                         f"got shape {tuple(labels.shape)}")
    if logits.shape[0] == 0 and not D.is_distributed():
        raise ValueError("logits is empty: a batch needs at least one sample")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got shape {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if not (check and checks_enabled()) or logits.shape[0] == 0:
        return
    _check_labels(labels, logits.shape[1])
    x = logits.detach()
    bad = ~torch.isfinite(x).all(1)
    # One host read for both value checks.
    like_probabilities = ((x >= 0) & (x <= 1)).all() & ((x.double().sum(1) - 1).abs() <= 1e-4).all()
    any_bad, like_probabilities = torch.stack([bad.any(), like_probabilities]).tolist()
    if any_bad:
        raise ValueError(f"logits have NaN or infinite values at sample indices {describe_indices(bad)}")
    if probability_check and like_probabilities:
        raise ValueError(
            "logits look like probabilities (every row is in [0, 1] and sums to 1): these losses take the "
            "classifier's raw logits (before softmax); pass the logits, or log-probabilities (log of "
            "these rows) which give the same softmax. If these really are logits, pass "
            "probability_check=False"
        )


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor, check: bool,
                  invertible: bool = False, probability_check: bool = True) -> torch.Tensor:
    """Validate shapes always, values when checks are on; returns ``T`` as float32 on the logits' device."""
    _check_logits_labels(logits, labels, check, probability_check)
    num_classes = logits.shape[1]
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"T must be a torch.Tensor [classes, classes], got {type(T).__name__}")
    if T.shape != (num_classes, num_classes):
        raise ValueError(f"T has shape {tuple(T.shape)} but logits have {num_classes} classes")
    if check and checks_enabled():
        check_transition(T, num_classes, invertible=invertible)
        impossible = T.detach().sum(1).to(labels.device)[labels] <= 0
        if bool(impossible.any()):
            raise ValueError(f"T gives probability 0 to the observed label of samples {describe_indices(impossible)} "
                             "(its row for that label is all zero)")
    return T.to(device=logits.device, dtype=torch.float32)


def _log_noisy_posterior(log_f: torch.Tensor, labels: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``log (T f)_{y_i} = logsumexp_k (log T[y_i, k] + log f_k)``, stable when ``f`` is nearly one-hot."""
    log_T = torch.where(T > 0, torch.log(T.clamp(min=torch.finfo(T.dtype).tiny)), torch.full_like(T, -torch.inf))
    return torch.logsumexp(log_T[labels] + log_f, dim=1)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _log_importance_weights(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor,
                            probability_check: bool = True) -> torch.Tensor:
    """``log w_i = log f_{y_i} - log (T f)_{y_i}``, detached float32 ``[B]``."""
    T = _check_inputs(logits, labels, T, check=True, probability_check=probability_check)
    log_f = F.log_softmax(logits.detach().float(), dim=1)
    y = labels.long()
    return log_f.gather(1, y.unsqueeze(1)).squeeze(1) - _log_noisy_posterior(log_f, y, T.detach())


def importance_weights(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor, *,
                       probability_check: bool = True) -> torch.Tensor:
    """``w_i = f_{y_i}(x_i) / (T @ f(x_i))_{y_i}``: how much more likely label ``y_i`` is clean than observed.

    Detached float32 of shape ``[B]``; ``T = I`` gives all ones. Computed in log space so that a
    confident ``f`` does not underflow to ``0 / 0``. ``w_i <= 1 / T[y_i, y_i]``; a weight beyond
    float32's range (a diagonal entry of ``T`` below about ``3e-39``) raises, naming the samples
    (:func:`reweight_loss`, :func:`dws_loss` and :func:`rent_loss` normalise in log space and are
    not affected). Logits whose rows all look like probability vectors raise unless
    ``probability_check=False``.
    """
    log_w = _log_importance_weights(logits, labels, T, probability_check)
    w = torch.exp(log_w)
    if checks_enabled():
        over = torch.isinf(w)
        if bool(over.any()):
            raise ValueError(
                f"importance weights overflow float32 at sample indices {describe_indices(over)} (log w up to "
                f"{float(log_w.max()):.4g}): T gives the observed label almost no chance under the predicted "
                "class; the losses normalise in log space and handle this, or use a smoothed T"
            )
    return w


def _normalised_weights(logits, labels, T, group, probability_check: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``mu = w / sum w`` over the global batch, computed as a softmax of ``log w`` (no overflow).

    Returns ``(mu over every rank [N], this rank's slice of mu, offset)``.
    """
    log_w = _log_importance_weights(logits, labels, T, probability_check)
    everything, offset = D.all_gather_uneven(log_w, group)
    mu = torch.softmax(everything.double(), dim=0).float()
    return mu, mu[offset : offset + log_w.shape[0]].to(log_w.device), offset


def forward_loss(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor, reduction: str = "mean",
                 *, check: bool = True, probability_check: bool = True) -> torch.Tensor:
    """Forward correction (FL): ``-log (T @ f(x))_y``, the NLL of the observed labels under ``T f``.

    ``T`` may carry a gradient (a learned matrix); ``check=False`` skips the value checks of ``T``,
    the labels and the logits.
    """
    T = _check_inputs(logits, labels, T, check=check, probability_check=probability_check)
    log_f = F.log_softmax(logits.float(), dim=1)
    return _reduce(-_log_noisy_posterior(log_f, labels.long(), T), reduction)


def backward_loss(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor, reduction: str = "mean",
                  *, probability_check: bool = True) -> torch.Tensor:
    """Backward correction: ``sum_k (T^-1)[k, y] CE(f, k)``, whose expectation over the noisy label
    equals the clean-label CE. Needs an invertible ``T`` (checked); can be negative."""
    T = _check_inputs(logits, labels, T, check=True, invertible=True, probability_check=probability_check)
    inverse = torch.linalg.inv(T.double()).float()
    ce_every_class = -F.log_softmax(logits.float(), dim=1)
    return _reduce((ce_every_class * inverse.t()[labels.long()]).sum(1), reduction)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def reweight_loss(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor, *, group=None,
                  probability_check: bool = True) -> torch.Tensor:
    """RW: ``sum_i mu_i CE(f(x_i), y_i)`` with ``mu = w / sum w`` over the global batch (a softmax of ``log w``)."""
    _, mu, _ = _normalised_weights(logits, labels, T, group, probability_check)
    return weighted_loss(_cross_entropy(logits, labels), mu, group=group)


def dws_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    T: torch.Tensor,
    alpha: float = 10.0,
    num_draws: int | None = None,
    *,
    generator: torch.Generator | None = None,
    group=None,
    probability_check: bool = True,
) -> torch.Tensor:
    """DWS: ``mean_m sum_i pi^(m)_i CE_i`` with ``pi^(m) ~ Dirichlet(alpha * mu)``, ``m = 1..M``.

    ``M = num_draws`` defaults to the global batch size (the authors' choice), ``alpha`` to 10.
    Large ``alpha`` approaches :func:`reweight_loss`; small ``alpha`` makes every draw nearly one-hot,
    i.e. resampling. Since the loss is linear in ``pi`` it equals ``sum_i mean_m(pi^(m)_i) CE_i``.
    """
    if num_draws is not None:
        check_count(num_draws, "num_draws", 1)
    check_positive_number(alpha, "alpha")
    everything, mine, offset = _normalised_weights(logits, labels, T, group, probability_check)
    draws = everything.shape[0] if num_draws is None else int(num_draws)
    pi = dirichlet_weights(everything, alpha, draws, generator=generator).mean(0)
    return weighted_loss(_cross_entropy(logits, labels), pi[offset : offset + mine.shape[0]].to(mine.device),
                         group=group)


def rent_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    T: torch.Tensor,
    num_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
    group=None,
    probability_check: bool = True,
) -> torch.Tensor:
    """RENT: the mean CE over ``num_samples`` indices drawn with replacement from ``Categorical(mu)``.

    ``num_samples`` defaults to the global batch size (``N = 1``). Written as
    ``sum_i (count_i / num_samples) CE_i``, which has the same value and gradient as indexing the
    drawn samples, and stays exact under data parallelism. ``T`` enters only through the weights.
    """
    if num_samples is not None:
        check_count(num_samples, "num_samples", 1)
    _, mu, _ = _normalised_weights(logits, labels, T, group, probability_check)
    counts = resample_counts(mu, num_samples, generator=generator, group=group)
    total = D.all_reduce_sum(counts.sum(), group)
    return weighted_loss(_cross_entropy(logits, labels), counts / total, group=group)


# Keyword options each loss accepts through noisy_label_loss(**options).
_OPTIONS = {
    "ce": ("probability_check",),
    "forward": ("reduction", "probability_check"),
    "backward": ("reduction", "probability_check"),
    "reweight": ("probability_check",),
    "dws": ("alpha", "num_draws", "probability_check"),
    "rent": ("num_samples", "probability_check"),
}


def noisy_label_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor | None,
                     *, generator: torch.Generator | None = None, group=None, **options) -> torch.Tensor:
    """Dispatch to one of :data:`LOSSES` by name (``"ce"`` ignores ``T``); ``options`` go to that loss.

    Options a loss does not take raise ``TypeError`` naming them and listing the ones it does.
    """
    check_choice(name, "loss", LOSSES)
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise TypeError(f"loss {name!r} does not take the option(s) {unknown}; its options are "
                        f"{list(_OPTIONS[name])}")
    if name == "ce":
        _check_logits_labels(logits, labels, probability_check=options.get("probability_check", True))
        return F.cross_entropy(logits.float(), labels.long())
    if T is None:
        raise ValueError(f"loss {name!r} needs a transition matrix T")
    if name == "forward":
        return forward_loss(logits, labels, T, **options)
    if name == "backward":
        return backward_loss(logits, labels, T, **options)
    if name == "reweight":
        return reweight_loss(logits, labels, T, group=group, **options)
    if name == "dws":
        return dws_loss(logits, labels, T, generator=generator, group=group, **options)
    return rent_loss(logits, labels, T, generator=generator, group=group, **options)
