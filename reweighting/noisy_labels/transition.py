"""Label-noise transition matrices: the layout, its validation, known matrices and estimators.

One layout everywhere (docs/methods/noisy-labels.md): ``T[noisy, clean] = P(noisy label | clean label)``.
Rows are indexed by the observed (noisy) label, columns by the clean label, so every **column**
sums to 1, and the noisy posterior is ``p(noisy | x) = T @ f(x)`` for the clean posterior ``f(x)``.
cleanlab's ``noise_matrix`` (``P(label = i | true_label = j)`` at ``[i, j]``) is in this layout too.
"""

from __future__ import annotations

import torch

from ..checks import check_batch, check_count, check_same_length, describe_indices

__all__ = [
    "COLUMN_SUM_TOLERANCE",
    "MAX_CONDITION",
    "check_transition",
    "symmetric_transition",
    "pair_transition",
    "estimate_transition",
    "transition_error",
    "ESTIMATORS",
]

COLUMN_SUM_TOLERANCE = 1e-4
"""Largest accepted ``|sum_noisy T[noisy, clean] - 1|`` for any column (and most negative entry)."""

MAX_CONDITION = 1e6
"""Largest accepted 2-norm condition number of ``T`` where a method inverts it."""

ESTIMATORS = ("anchor", "dualt")


def check_transition(
    T: torch.Tensor,
    num_classes: int | None = None,
    *,
    name: str = "T",
    invertible: bool = False,
    atol: float = COLUMN_SUM_TOLERANCE,
) -> torch.Tensor:
    """Validate a transition matrix in the ``T[noisy, clean]`` layout and return it as float32.

    Raises ``ValueError`` naming the problem and where it is: not a square 2-d tensor, a size other
    than ``num_classes``, NaN or infinite entries, entries below ``-atol``, columns (clean classes)
    whose sum differs from 1 by more than ``atol``, or, with ``invertible=True``, a condition number
    above :data:`MAX_CONDITION` (numerically singular). A matrix whose *rows* sum to 1 but whose
    columns do not is most likely transposed, and the message says so.
    """
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if T.dim() != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"{name} must be a square [classes, classes] matrix, got shape {tuple(T.shape)}")
    if num_classes is not None and T.shape[0] != num_classes:
        raise ValueError(f"{name} is {T.shape[0]}x{T.shape[1]} but there are {num_classes} classes")
    m = T.detach().double()
    bad = ~torch.isfinite(m)
    if bool(bad.any()):
        raise ValueError(f"{name} has NaN or infinite entries in columns (clean classes) "
                         f"{describe_indices(bad.any(0))}")
    negative = m < -atol
    if bool(negative.any()):
        raise ValueError(f"{name} has negative entries in columns (clean classes) {describe_indices(negative.any(0))}")
    off = (m.sum(0) - 1).abs() > atol
    if bool(off.any()):
        hint = ""
        if bool(((m.sum(1) - 1).abs() <= atol).all()):
            hint = "; its rows sum to 1, so it is probably transposed (the layout is T[noisy, clean])"
        raise ValueError(
            f"{name} must have columns summing to 1 (T[noisy, clean] = P(noisy | clean), tolerance {atol:g}); "
            f"columns (clean classes) {describe_indices(off)} sum to {m.sum(0)[off].tolist()}{hint}"
        )
    if invertible:
        cond = torch.linalg.cond(m)
        if not bool(torch.isfinite(cond)) or float(cond) > MAX_CONDITION:
            raise ValueError(f"{name} is singular (condition number {float(cond):.3g} > {MAX_CONDITION:g}) "
                             "and cannot be inverted")
    return T.float()


def symmetric_transition(num_classes: int, rate: float) -> torch.Tensor:
    """Symmetric noise: a label is kept with probability ``1 - rate`` and otherwise replaced by one
    of the other ``num_classes - 1`` classes uniformly: ``T = (1 - rate) I + rate / (C - 1) (1 - I)``."""
    num_classes = _check_rate(rate, num_classes)
    eye = torch.eye(num_classes)
    return (1 - rate) * eye + rate / (num_classes - 1) * (1 - eye)


def pair_transition(num_classes: int, rate: float, mapping: list[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric (pair) noise: clean class ``j`` becomes ``mapping[j]`` with probability ``rate``.

    ``mapping`` defaults to the pair flip ``j -> (j + 1) mod C``. A class mapped to itself is never
    corrupted. ``T[mapping[j], j] += rate`` and ``T[j, j] = 1 - rate`` otherwise.
    """
    num_classes = _check_rate(rate, num_classes)
    target = torch.arange(1, num_classes + 1) % num_classes if mapping is None else torch.as_tensor(mapping).long()
    if target.shape != (num_classes,) or bool(((target < 0) | (target >= num_classes)).any()):
        raise ValueError(f"mapping must give one class in [0, {num_classes}) for each of the {num_classes} classes, "
                         f"got {target.tolist()}")
    T = (1 - rate) * torch.eye(num_classes)
    T[target, torch.arange(num_classes)] += rate
    return T


def _check_rate(rate: float, num_classes: int) -> int:
    num_classes = check_count(num_classes, "num_classes", 2)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate must be a number in [0, 1), got {type(rate).__name__} {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    return num_classes


def _check_labels(labels: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """Every label must be an integer class index in ``[0, num_classes)``; raises naming the samples that are not."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    out = (labels < 0) | (labels >= num_classes)
    if bool(out.any()):
        raise ValueError(f"{name} outside [0, {num_classes}) at sample indices {describe_indices(out)}")


def _check_posteriors(probs: torch.Tensor, noisy_labels: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"probs must be a [samples, classes] tensor, got {getattr(probs, 'shape', type(probs))}")
    p = probs.detach().double()
    bad = ~torch.isfinite(p).all(1) | (p < 0).any(1) | ((p.sum(1) - 1).abs() > 1e-3)
    if bool(bad.any()):
        raise ValueError(f"probs rows must be probability vectors (finite, >= 0, summing to 1); "
                         f"samples {describe_indices(bad)} are not")
    if noisy_labels is not None:
        check_batch(noisy_labels, "noisy_labels")
        check_same_length(noisy_labels, "noisy_labels", p, "probs")
        _check_labels(noisy_labels, p.shape[1], "noisy_labels")
    return p


def _anchor_transition(p: torch.Tensor, noisy_labels: torch.Tensor | None, quantile: float) -> torch.Tensor:
    num_classes = p.shape[1]
    T = torch.empty(num_classes, num_classes, dtype=torch.float64)
    for j in range(num_classes):
        pool = p if noisy_labels is None else p[noisy_labels.to(p.device) == j]
        if pool.shape[0] == 0:
            raise ValueError(f"no sample has noisy label {j}: cannot pick an anchor point for class {j}")
        order = torch.argsort(pool[:, j])
        anchor = order[round(quantile * (pool.shape[0] - 1))]
        # The sample most surely of class j has clean posterior e_j, so its noisy posterior T e_j
        # is column j of T.
        T[:, j] = pool[anchor]
    return T


def estimate_transition(
    probs: torch.Tensor,
    noisy_labels: torch.Tensor | None = None,
    method: str = "anchor",
    quantile: float = 0.97,
) -> torch.Tensor:
    """Estimate ``T[noisy, clean]`` from a warmed-up model's noisy posteriors ``probs`` ``[N, C]``.

    - ``"anchor"`` (Patrini et al.'s "Forward" estimator): for each class ``j`` take the sample at
      the ``quantile`` of ``p_hat(j | x)`` (nearest rank; ``quantile = 1`` is the arg-max) as an
      anchor point of clean class ``j``; its predicted distribution is column ``j`` of ``T``. With
      ``noisy_labels`` given, only samples observed with label ``j`` are candidates for class ``j``
      (as in the authors' code); without, all samples are.
    - ``"dualt"`` (Yao et al.): ``T = T_spade @ T_club`` with ``T_club`` the anchor estimate of
      ``P(predicted | clean)`` and ``T_spade[noisy, k] = #(label = noisy, argmax p_hat = k) / #(argmax
      p_hat = k)`` counted on the data (needs ``noisy_labels``). A class that is never predicted
      gets the identity column, since there is nothing to count.

    Returns a float32 matrix whose columns sum to 1 (checked by :func:`check_transition`).
    """
    if method not in ESTIMATORS:
        raise ValueError(f"method must be one of {ESTIMATORS}, got {method!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
    p = _check_posteriors(probs, noisy_labels)
    T = _anchor_transition(p, noisy_labels, float(quantile))
    if method == "dualt":
        if noisy_labels is None:
            raise ValueError("method='dualt' needs noisy_labels to count the noisy label of each prediction")
        num_classes = p.shape[1]
        predicted = p.argmax(1)
        counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        counts.index_put_((noisy_labels.long().cpu(), predicted.cpu()), torch.ones(p.shape[0], dtype=torch.float64),
                          accumulate=True)
        total = counts.sum(0, keepdim=True)
        spade = torch.where(total > 0, counts / total.clamp(min=1), torch.eye(num_classes, dtype=torch.float64))
        T = spade @ T
    T = T / T.sum(0, keepdim=True)  # remove float rounding so the check's tolerance is not spent here
    return check_transition(T.float(), name=f"estimated T ({method})")


def transition_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative estimation error ``sum |T_hat - T| / sum |T|`` (0 = exact; at most 2)."""
    a = check_transition(estimate, name="estimate").double()
    b = check_transition(truth, a.shape[0], name="truth").double()
    return float((a - b).abs().sum() / b.abs().sum())
