"""Denoising score matching on biased data: DSM, IW-DSM and TIW-DSM (docs/methods/tiw-dsm.md).

All three noise ``x_0`` from the training stream as ``x_t = alpha(t) x_0 + sigma(t) eps`` and
regress the model's prediction on a target; they differ in a per-sample weight and a shift of
the target:

    DSM      l_i = lambda(t_i) mean_dims (f(x_t, t) - target)^2
    IW-DSM   w(x_0) l_i                       w from the discriminator at t = t_min, on clean x_0
    TIW-DSM  w_t(x_t) l_i with the target corrected by g = grad_x log w_t(x_t)

The TIW-DSM objective (Kim et al. 2024, eq. for L_TIW-DSM) is
``E_t E_{x_0 ~ p_obs, eps} [ w_t(x_t) || s_theta - grad log p(x_t | x_0) - g ||^2 ]``, whose minimiser
is the score of ``p_data``: the correction turns the conditional target, whose mean given ``x_t``
is the *biased* score, into one whose mean is the *data* score, since
``grad log p_data^t = grad log p_bias^t + grad log w_t``. Every parameterisation is an affine
function of the score, ``x_0 = (x_t + sigma^2 score) / alpha``, ``eps = -sigma score``,
``v = alpha eps - sigma x_0``, so the correction enters each target with its own factor:

    eps    eps - sigma g
    x0     x_0 + (sigma^2 / alpha) g
    v      v - sigma (alpha^2 + sigma^2) / alpha g      (v - (sigma / alpha) g when alpha^2 + sigma^2 = 1)
    score  -eps / sigma + g

**Normalisation.** The objective is an expectation, so the weight is ``w_t`` itself: the scalar
is ``(1 / N) sum_i w_i l_i`` over the global batch of ``N`` samples (computed with
:func:`reweighting.weighted_loss`, so it is right under DDP with unequal per-rank batches). With
``self_normalize=True`` it is ``sum_i w_i l_i / sum_i w_i`` over the global batch instead: lower
variance when a few weights are large, at the price of a bias of order ``1 / N``.

Weights and per-sample losses have shape ``[B]`` whatever the shape of ``x_0``; they scale each
sample on its own (never a ``[B, B, ...]`` broadcast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .. import distributed as D
from ..checks import check_finite, checks_enabled
from ..reduce import weighted_loss
from .ratio import TimeDependentRatio
from .schedules import NoiseSchedule, check_samples, expand_like

__all__ = ["PREDICTIONS", "denoising_target", "correction_scale", "dsm_loss", "iw_dsm_loss", "tiw_dsm_loss"]

PREDICTIONS = ("eps", "x0", "v", "score")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.Module


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def correction_scale(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The factor ``c(t)`` in ``corrected target = target + c(t) g`` (module docstring), shaped like ``alpha``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return -sigma
    if prediction == "x0":
        return sigma * sigma / alpha
    if prediction == "v":
        return -sigma * (alpha * alpha + sigma * sigma) / alpha
    return torch.ones_like(sigma)


def denoising_target(
    prediction: str,
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    correction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The regression target of a parameterisation, shifted by ``c(t) g`` when ``correction = g`` is given.

    ``alpha`` and ``sigma`` have shape ``[B]``; ``x0``, ``eps`` and ``correction`` are shaped like the data.
    Targets: ``eps``; ``x0``; ``v = alpha eps - sigma x0``; ``score = -eps / sigma`` (the score of
    ``p(x_t | x_0)``).
    """
    _check_prediction(prediction)
    a, s = expand_like(alpha.to(x0.dtype), x0), expand_like(sigma.to(x0.dtype), x0)
    if prediction == "eps":
        target = eps
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        target = a * eps - s * x0
    else:
        target = -eps / s
    if correction is not None:
        if correction.shape != x0.shape:
            raise ValueError(f"correction must be shaped like x0 {tuple(x0.shape)}, got {tuple(correction.shape)}")
        target = target + correction_scale(prediction, a, s) * correction.to(target.dtype)
    return target


def _check_inputs(x0: torch.Tensor, t: torch.Tensor | None, noise: torch.Tensor | None, model: Model,
                  schedule: NoiseSchedule, ratio: TimeDependentRatio | None) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule (VPLinear, VPCosine, VE, EDM), got "
                        f"{type(schedule).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if ratio is not None and not isinstance(ratio, TimeDependentRatio):
        raise TypeError(f"ratio must be a TimeDependentRatio, got {type(ratio).__name__}")
    check_samples(x0, "x0", model, "model")
    if ratio is not None:
        check_samples(x0[:0], "x0", ratio.discriminator, "discriminator")
    if x0.shape[0] == 0 and not D.is_distributed():
        raise ValueError("x0 is empty: a batch needs at least one sample")
    if t is not None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor [batch] of times, got {type(t).__name__}")
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape [{x0.shape[0]}] (one time per sample), got {tuple(t.shape)}")
        schedule.check_time(t)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
            raise ValueError(f"noise must be shaped like x0 {tuple(x0.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        if noise.dtype != x0.dtype:
            raise TypeError(f"noise is {noise.dtype} but x0 is {x0.dtype}")
        if checks_enabled():
            check_finite(noise.detach().reshape(noise.shape[0], -1).sum(1), "noise")


def _denoising_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    *,
    ratio: TimeDependentRatio | None,
    reweight: bool,
    correct: bool,
    time_independent: bool,
    t: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    loss_weight: Callable[[torch.Tensor], torch.Tensor] | None,
    self_normalize: bool,
    group,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_prediction(prediction)
    _check_inputs(x0, t, noise, model, schedule, ratio)
    if loss_weight is not None and not callable(loss_weight):
        raise TypeError(f"loss_weight must be a function of t or None, got {type(loss_weight).__name__}")
    batch = x0.shape[0]
    if t is None:
        t = schedule.sample_time(batch, generator=generator, device=x0.device)
    t = t.to(x0.device)
    x_t, eps = schedule.add_noise(x0, t, noise, generator=generator)
    alpha, sigma = schedule.alpha_sigma(t)

    log_w = g = None
    if ratio is not None and time_independent:
        t_clean = torch.full_like(t, schedule.t_min)
        log_w = ratio.log_weight(x0, t_clean)
    elif ratio is not None and correct:
        log_w, g = ratio.log_weight_and_grad(x_t, t)
    elif ratio is not None and reweight:
        log_w = ratio.log_weight(x_t, t)
    if not reweight:
        log_w = None

    target = denoising_target(prediction, x0, eps, alpha, sigma, g).detach()
    pred = model(x_t, t)
    if pred.shape != x0.shape:
        raise ValueError(f"model output has shape {tuple(pred.shape)}, expected the shape of x0 {tuple(x0.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).reshape(batch, -1).mean(dim=1)
    if loss_weight is not None:
        lam = loss_weight(t).float().detach()
        if lam.shape != (batch,):
            raise ValueError(f"loss_weight(t) must have shape [{batch}], got {tuple(lam.shape)}")
        per_sample = lam * per_sample
    if checks_enabled():
        check_finite(per_sample.detach(), "per-sample denoising loss")

    w = torch.ones(batch, device=x0.device) if log_w is None else torch.exp(log_w.float()).to(x0.device)
    total = D.all_reduce_sum(w.sum(), group) if self_normalize else D.global_count(batch, x0.device, group)
    return weighted_loss(per_sample, w / total, group=group), w * per_sample


def dsm_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain denoising score matching: ``(mean_i l_i, l [B])`` over the global batch.

    ``model(x_t, t)`` predicts ``prediction`` (``"eps"``, ``"x0"``, ``"v"`` or ``"score"``).
    ``t`` and ``noise`` default to draws from ``schedule`` (with ``generator``); ``loss_weight(t)``
    is an optional ``lambda(t)`` of shape ``[B]``.
    """
    return _denoising_loss(
        model, x0, schedule, prediction, ratio=None, reweight=False, correct=False, time_independent=False,
        t=t, noise=noise, generator=generator, loss_weight=loss_weight, self_normalize=False, group=group,
    )


def iw_dsm_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    ratio: TimeDependentRatio,
    *,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    self_normalize: bool = False,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted DSM with a time-independent weight ``w(x_0)``: ``(mean_i w_i l_i, w * l [B])``.

    ``w(x_0)`` is ``ratio`` evaluated on the clean sample at ``t = schedule.t_min``. Unbiased for
    ``p_data`` if the ratio is exact, but a clean-data discriminator is easily over-confident and
    the weights then concentrate on a few samples (the paper's "density chasm").
    """
    return _denoising_loss(
        model, x0, schedule, prediction, ratio=ratio, reweight=True, correct=False, time_independent=True,
        t=t, noise=noise, generator=generator, loss_weight=loss_weight, self_normalize=self_normalize, group=group,
    )


def tiw_dsm_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    ratio: TimeDependentRatio,
    *,
    prediction: str = "eps",
    reweight: bool = True,
    correct: bool = True,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    self_normalize: bool = False,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time-dependent importance-weighted DSM: ``(mean_i w_t(x_t^i) l_i, w * l [B])`` with corrected targets.

    ``reweight`` multiplies each sample's loss by ``w_t(x_t)``; ``correct`` shifts the target by
    ``c(t) grad_x log w_t(x_t)`` (see :func:`denoising_target`). Both on is TIW-DSM; ``correct``
    alone and ``reweight`` alone are the paper's ablations, and both off is :func:`dsm_loss`.
    The weight and the correction are detached: gradients reach the score model only.
    """
    return _denoising_loss(
        model, x0, schedule, prediction, ratio=ratio, reweight=reweight, correct=correct, time_independent=False,
        t=t, noise=noise, generator=generator, loss_weight=loss_weight, self_normalize=self_normalize, group=group,
    )
