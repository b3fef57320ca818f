"""The weight core: pure functions from per-sample scores to per-sample weights.

Every function here works on the **global** batch when ``torch.distributed`` is initialised: the
statistics it needs (maximum, sum, minimum, mean, variance, ranks) are taken over all ranks, and
this rank's slice of the result is returned. Per-rank batch sizes may differ. Weights are detached
and computed in float32 whatever the input precision.

An optional boolean ``mask`` (True = take part) lets a caller exclude samples (padding, or samples
whose loss is not finite under an opt-in policy): excluded samples get weight 0 and do not enter
any statistic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from . import distributed as D
from .checks import (
    check_batch,
    check_finite,
    check_mask,
    check_positive_number,
    check_temperature,
    check_weight_values,
    checks_enabled,
)

__all__ = [
    "tilt",
    "minmax_normalize",
    "zscore",
    "rank_normalize",
    "quantile_normalize",
    "normalize",
    "NORMALIZATIONS",
    "WeightStats",
    "weight_stats",
]

NORMALIZATIONS = ("minmax", "quantile", "rank", "zscore")


def _prepare(x: torch.Tensor, name: str, mask: torch.Tensor | None, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached float32 copy of ``x`` and a boolean mask, validated."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real numbers (a float or integer tensor), got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-d (one value per sample), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not D.is_distributed(group):
        raise ValueError(f"{name} is empty: a batch needs at least one sample")
    values = x.detach().float()
    if mask is None:
        if checks_enabled():
            check_finite(values, name)
        return values, torch.ones_like(values, dtype=torch.bool)
    check_mask(mask, x, name)
    mask = mask.to(device=values.device, dtype=torch.bool)
    # Masked-out samples may hold anything (NaN, inf): zero them so that no product with the mask sees them.
    values = torch.where(mask, values, torch.zeros_like(values))
    if checks_enabled():
        check_finite(torch.where(mask, values, torch.zeros_like(values)), name)
        if not bool(D.all_reduce_sum(mask.sum().float(), group) > 0):
            raise ValueError(f"mask excludes every sample of {name}: nothing left to weight")
    return values, mask


def _masked_max(v: torch.Tensor, mask: torch.Tensor, group) -> torch.Tensor:
    local = torch.where(mask, v, torch.full_like(v, -math.inf)).amax() if v.numel() else v.new_tensor(-math.inf)
    return D.all_reduce_max(local, group)


def _masked_range(v: torch.Tensor, mask: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (max, min) over the included samples, in one all-reduce (max of ``[max, -min]``)."""
    if v.numel():
        local = torch.stack([torch.where(mask, v, torch.full_like(v, -math.inf)).amax(),
                             -torch.where(mask, v, torch.full_like(v, math.inf)).amin()])
    else:
        local = v.new_full((2,), -math.inf)
    hi, neg_lo = D.all_reduce_max(local, group)
    return hi, -neg_lo


def tilt(
    scores: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Tempered softmax over the global batch: ``w_i = exp(s_i / T) / sum_j exp(s_j / T)``.

    This is step 3 of the loss-based method (``softmax(f / r)``), PRESENCE's ``softmax(tau * s)``
    (with ``T = 1 / |tau|`` and the sign folded into ``scores``) and Q-probe's ``softmax(Q / beta)``.
    It is the closed-form maximiser of ``sum_i w_i s_i - T * KL(w || uniform)``, so
    ``max w / min w <= exp((max s - min s) / T)``. The maximum is subtracted first for stability.
    Weights sum to 1 over all ranks; this rank's slice is returned (float32, detached).
    """
    check_temperature(temperature)
    values, mask = _prepare(scores, "scores", mask, group)
    logits = torch.where(mask, values / float(temperature), torch.full_like(values, -math.inf))
    peak = _masked_max(logits, mask, group)
    unnormalised = torch.exp(logits - peak)
    total = D.all_reduce_sum(unnormalised.sum(), group)
    return unnormalised / total


def minmax_normalize(
    x: torch.Tensor, delta: float = 1.0, *, eps: float = 1e-6, mask: torch.Tensor | None = None, group=None
) -> torch.Tensor:
    """``h_i = delta * (2 x_i - x_max - x_min) / max(x_max - x_min, eps)``, so ``h in [-delta, delta]``.

    The paper's normalisation (docs/methods/loss-based.md, step 1). One outlier sets the whole range,
    squashing every other sample towards one end: see :func:`quantile_normalize` and
    :func:`rank_normalize` for robust alternatives. Excluded samples get 0.
    """
    check_positive_number(delta, "delta")
    check_positive_number(eps, "eps")
    values, mask = _prepare(x, "x", mask, group)
    hi, lo = _masked_range(values, mask, group)
    h = delta * (2 * values - hi - lo) / torch.clamp(hi - lo, min=eps)
    return torch.where(mask, h, torch.zeros_like(h))


def zscore(x: torch.Tensor, *, eps: float = 1e-8, mask: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """``s_i = (x_i - mean(x)) / sqrt(var(x) + eps)`` with the population variance over the global batch.

    PRESENCE's standardisation of self-influence (docs/methods/presence.md). Excluded samples get 0.
    ``eps`` keeps a constant input (all deviations 0) at finite zeros rather than ``0 / 0``.
    """
    check_positive_number(eps, "eps")
    values, mask = _prepare(x, "x", mask, group)
    m = mask.float()
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly.
    stats = D.all_reduce_sum(torch.stack([m.sum(), (values * m).sum()]), group)
    mean = stats[1] / stats[0]
    var = D.all_reduce_sum((((values - mean) * m) ** 2).sum(), group) / stats[0]
    s = (values - mean) / torch.sqrt(var + eps)
    return torch.where(mask, s, torch.zeros_like(s))


def _global_values(values: torch.Tensor, mask: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' values and masks concatenated, and this rank's offset (one host sync)."""
    gathered, offset = D.all_gather_uneven(values, group)
    gathered_mask, _ = D.all_gather_uneven(mask, group)
    return gathered, gathered_mask, offset


def rank_normalize(
    x: torch.Tensor, delta: float = 1.0, *, mask: torch.Tensor | None = None, group=None
) -> torch.Tensor:
    """Rank of each sample in the global batch mapped linearly onto ``[-delta, delta]``.

    ``h_i = delta * (2 r_i / (n - 1) - 1)`` with ``r_i`` the 0-based rank (ties get their average
    rank) among the ``n`` included samples; a single sample gets 0. Insensitive to outliers: the
    largest loss gets ``delta`` however large it is. Gathers the global batch (one host sync).
    """
    check_positive_number(delta, "delta")
    values, mask = _prepare(x, "x", mask, group)
    everything, every_mask, offset = _global_values(values, mask, group)
    # Excluded samples sort last (as +inf) rather than being dropped, so no shape depends on the
    # mask and nothing is read back to the host.
    n = every_mask.sum()
    # Average rank with ties: (#strictly smaller) + (#equal - 1) / 2, by binary search on the sorted values.
    ordered = torch.sort(torch.where(every_mask, everything, torch.full_like(everything, math.inf))).values
    below = torch.searchsorted(ordered, values, right=False)
    upto = torch.minimum(torch.searchsorted(ordered, values, right=True), n)
    ranks = below.float() + (upto - below - 1).float() / 2
    h = delta * (2 * ranks / (n - 1).clamp(min=1) - 1)
    h = torch.where(n > 1, h, torch.zeros_like(h))
    return torch.where(mask, h, torch.zeros_like(h))


def quantile_normalize(
    x: torch.Tensor,
    delta: float = 1.0,
    *,
    q: float = 0.05,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Min-max normalisation on the ``[q, 1 - q]`` quantile range, clipped to ``[-delta, delta]``.

    ``h_i = clip(delta * (2 x_i - hi - lo) / max(hi - lo, eps), -delta, delta)`` with ``lo``, ``hi``
    the global ``q`` and ``1 - q`` quantiles. Up to a share ``q`` of outliers at either end no
    longer squash the rest; they are clipped to the end of the range (they are still weighted, not
    dropped). Gathers the global batch (one host sync).
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q < 0.5:
        raise ValueError(f"q must be a number in [0, 0.5), got {q!r}")
    check_positive_number(delta, "delta")
    check_positive_number(eps, "eps")
    values, mask = _prepare(x, "x", mask, group)
    everything, every_mask, _ = _global_values(values, mask, group)
    # Excluded samples become NaN, which nanquantile skips: no shape depends on the mask (no host read).
    masked = torch.where(every_mask, everything, torch.full_like(everything, math.nan))
    lo, hi = torch.nanquantile(masked, torch.tensor([q, 1 - q], device=masked.device, dtype=masked.dtype))
    h = torch.clamp(delta * (2 * values - hi - lo) / torch.clamp(hi - lo, min=eps), -delta, delta)
    return torch.where(mask, h, torch.zeros_like(h))


def normalize(
    x: torch.Tensor, method: str = "minmax", delta: float = 1.0, *, mask: torch.Tensor | None = None, group=None
) -> torch.Tensor:
    """Dispatch to one of :data:`NORMALIZATIONS` by name (``"zscore"`` ignores ``delta``)."""
    if method == "minmax":
        return minmax_normalize(x, delta, mask=mask, group=group)
    if method == "quantile":
        return quantile_normalize(x, delta, mask=mask, group=group)
    if method == "rank":
        return rank_normalize(x, delta, mask=mask, group=group)
    if method == "zscore":
        return zscore(x, mask=mask, group=group)
    raise ValueError(f"method must be one of {NORMALIZATIONS}, got {method!r}")


@dataclass
class WeightStats:
    """Diagnostics of one set of weights over the global batch (tensors until :meth:`as_dict`).

    - ``n``: samples that took part; ``ess``: effective sample size ``(sum w)^2 / sum w^2``
      (``n`` for uniform weights, 1 when one sample takes everything); ``ess_fraction = ess / n``;
    - ``entropy`` of the normalised weights (``log n`` when uniform);
    - ``max_min_ratio``: largest over smallest weight among the samples that took part;
    - ``n_nonfinite``: samples whose signal was NaN or infinite; ``n_dropped``: samples given
      weight 0 by a policy (including the non-finite ones under the ``"zero"`` policy and the
      ones excluded by a caller's mask); ``n_masked``: samples excluded by a caller's mask (for
      example sequences with no labelled token).
    """

    n: torch.Tensor
    ess: torch.Tensor
    ess_fraction: torch.Tensor
    entropy: torch.Tensor
    max_weight: torch.Tensor
    min_weight: torch.Tensor
    max_min_ratio: torch.Tensor
    n_nonfinite: torch.Tensor
    n_dropped: torch.Tensor
    n_masked: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Plain floats for a logger (this reads the values back to the host)."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def weight_stats(
    weights: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    n_nonfinite: int | torch.Tensor = 0,
    n_dropped: int | torch.Tensor = 0,
    n_masked: int | torch.Tensor = 0,
    group=None,
) -> WeightStats:
    """Compute :class:`WeightStats` for this rank's slice of a global set of weights.

    ``n_nonfinite``, ``n_dropped`` and ``n_masked`` are this rank's counts; they are summed over
    ranks. Weights must be finite and >= 0 (checked with one host sync unless checks are off);
    in one process at least one included weight must be positive.
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not D.is_distributed(group):
        check_batch(weights, "weights")
    elif weights.dim() != 1:
        raise ValueError(f"weights must be 1-d (one value per sample), got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if mask is not None:
        check_mask(mask, weights, "weights")
    w = weights.detach().float()
    keep = None if mask is None else mask.to(device=w.device, dtype=torch.bool)
    wk = w if keep is None else torch.where(keep, w, torch.zeros_like(w))
    if checks_enabled():
        check_weight_values(wk, "weights", require_positive=not D.is_distributed(group))
    # Counts and moments in one all-reduce; Python counts become one small tensor (this runs on
    # every training step, so the number of tensor ops matters more than their size).
    parts = [w.shape[0] if keep is None else keep.sum(), n_nonfinite, n_dropped, n_masked]
    if any(isinstance(c, torch.Tensor) for c in parts):
        counts = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=w.device).reshape(()) for c in parts])
    else:
        counts = w.new_tensor([float(c) for c in parts])
    moments = torch.stack([wk.sum(), (wk * wk).sum(), torch.special.xlogy(wk, wk).sum()])
    sums = D.all_reduce_sum(torch.cat([counts, moments]), group)
    n, nonfinite, dropped, masked, total, squares, w_log_w = sums.unbind()
    if keep is None and not D.is_distributed(group):
        lo, hi = torch.aminmax(w)
    else:
        hi, lo = _masked_range(w, torch.ones_like(w, dtype=torch.bool) if keep is None else keep, group)
    ess = total * total / squares
    # Entropy of p = w / total: -sum p log p = log(total) - sum(w log w) / total.
    entropy = torch.log(total) - w_log_w / total
    return WeightStats(
        n=n, ess=ess, ess_fraction=ess / n, entropy=entropy, max_weight=hi, min_weight=lo,
        max_min_ratio=hi / lo, n_nonfinite=nonfinite, n_dropped=dropped, n_masked=masked,
    )

