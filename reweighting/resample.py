"""Resampling within a batch and Dirichlet weight draws, all driven by a ``torch.Generator``.

Three ways to turn weights ``w`` (any non-negative values; they are normalised to ``mu = w / sum w``)
into a training signal (docs/methods/noisy-labels.md, the DWS family):

- reweighting: ``sum_i mu_i l_i`` (see :func:`reweighting.weighted_loss`);
- resampling: draw indices ``idx ~ Categorical(mu)`` and take ``mean_k l_{idx_k}``;
- Dirichlet weight sampling: ``pi ~ Dirichlet(alpha * mu)``, loss ``sum_i pi_i l_i``, which
  interpolates between the two (``alpha -> inf``: reweighting; ``alpha -> 0``: one-hot draws).
"""

from __future__ import annotations

import torch

from . import distributed as D
from .checks import check_choice, check_count, check_nonnegative_weights, check_positive_number

__all__ = [
    "multinomial_resample",
    "systematic_resample",
    "resample_counts",
    "dirichlet_weights",
]


RESAMPLE_METHODS = ("multinomial", "systematic")


def _probabilities(weights: torch.Tensor) -> torch.Tensor:
    if isinstance(weights, torch.Tensor) and not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    check_nonnegative_weights(weights, "weights")
    w = weights.detach().double()
    return w / w.sum()


def multinomial_resample(
    weights: torch.Tensor, num_samples: int | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices drawn i.i.d. with replacement from ``Categorical(w / sum w)``.

    ``num_samples`` defaults to the batch size. Returns a long tensor of shape ``[num_samples]``.
    """
    p = _probabilities(weights)
    n = p.shape[0] if num_samples is None else check_count(num_samples, "num_samples", 1)
    return torch.multinomial(p.float(), n, replacement=True, generator=generator)


def systematic_resample(
    weights: torch.Tensor, num_samples: int | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Systematic resampling: one uniform offset ``u``, points ``(u + k) / n``, inverted through the CDF.

    Unbiased like multinomial resampling (each index appears ``n * mu_i`` times in expectation)
    but with far lower variance: every index appears ``floor(n mu_i)`` or ``ceil(n mu_i)`` times.
    Returns sorted indices of shape ``[num_samples]``.
    """
    p = _probabilities(weights)
    n = p.shape[0] if num_samples is None else check_count(num_samples, "num_samples", 1)
    u = torch.rand((), generator=generator, dtype=torch.float64,
                   device=p.device if generator is None else generator.device)
    points = (u.to(p.device) + torch.arange(n, dtype=torch.float64, device=p.device)) / n
    cdf = torch.cumsum(p, 0)
    cdf[-1] = 1.0  # guard against rounding leaving the last point past the end
    return torch.searchsorted(cdf, points, right=True).clamp_(max=p.shape[0] - 1)


def resample_counts(
    weights: torch.Tensor,
    num_samples: int | None = None,
    *,
    method: str = "multinomial",
    generator: torch.Generator | None = None,
    group=None,
) -> torch.Tensor:
    """How many times each of this rank's samples is drawn when resampling the **global** batch.

    Draws ``num_samples`` indices (default: the global batch size) from ``Categorical(mu)`` over
    all ranks' samples and returns this rank's slice of the counts (float32). Then
    ``weighted_loss(loss, counts / num_samples)`` has exactly the gradient of the mean loss over
    the drawn indices, under data parallelism too. Every rank must pass a generator in the same
    state (same seed, same number of previous draws) so that all draw the same indices. Gathers
    the weights over ranks (one host sync).
    """
    check_choice(method, "method", RESAMPLE_METHODS)
    if num_samples is not None:
        check_count(num_samples, "num_samples", 1)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-d (one value per sample), got shape {tuple(weights.shape)}")
    everything, offset = D.all_gather_uneven(weights.detach(), group)
    if method == "multinomial":
        idx = multinomial_resample(everything, num_samples, generator=generator)
    elif method == "systematic":
        idx = systematic_resample(everything, num_samples, generator=generator)
    else:
        raise ValueError(f"method must be 'multinomial' or 'systematic', got {method!r}")
    counts = torch.bincount(idx.to(everything.device), minlength=everything.shape[0]).float()
    return counts[offset : offset + weights.shape[0]]


def dirichlet_weights(
    weights: torch.Tensor,
    alpha: float,
    num_draws: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws ``pi^(m) ~ Dirichlet(alpha * mu)``, ``mu = w / sum w``, for ``m = 1..num_draws``.

    Returns float32 of shape ``[num_draws, B]``, each row summing to 1, with ``E[pi] = mu``.
    Samples with ``w_i = 0`` get 0 in every draw. Small concentrations are handled in log space
    (``Gamma(a) = Gamma(a + 1) * U^(1 / a)``) so that draws with ``alpha -> 0`` stay finite and
    become one-hot instead of collapsing to 0 / 0.
    """
    check_positive_number(alpha, "alpha")
    alpha = float(alpha)
    num_draws = check_count(num_draws, "num_draws", 1)
    mu = _probabilities(weights)
    positive = mu > 0
    concentration = (alpha * mu[positive]).expand(int(num_draws), -1).contiguous()
    gamma_shifted = torch._standard_gamma(concentration + 1.0, generator=generator)
    uniform = torch.rand(concentration.shape, dtype=concentration.dtype, device=concentration.device,
                         generator=generator).clamp_(min=torch.finfo(concentration.dtype).tiny)
    log_gamma = torch.log(gamma_shifted) + torch.log(uniform) / concentration
    draws = torch.zeros(int(num_draws), mu.shape[0], dtype=torch.float64, device=mu.device)
    draws[:, positive] = torch.softmax(log_gamma, dim=1)
    return draws.float()
