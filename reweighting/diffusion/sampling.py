"""Samplers for a model trained with any schedule and parameterisation of this package.

**Probability-flow ODE.** With ``y = x / alpha`` and ``lambda = sigma / alpha`` the ODE is
``dy / dlambda = eps_hat(x, t)`` (the DDIM form), so an Euler step is exact when ``eps_hat`` is
constant; Heun's method averages ``eps_hat`` at both ends of a step (second order).

**Ancestral.** Each step from ``t`` down to ``s`` draws from the Gaussian posterior
``q(x_s | x_t, x_0 = x0_hat)`` of the forward process: with ``alpha_ts = alpha_t / alpha_s`` and
``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``, mean
``(alpha_ts sigma_s^2 x_t + alpha_s sigma_ts^2 x0_hat) / sigma_t^2`` and variance ``sigma_ts^2 sigma_s^2 / sigma_t^2``.

Both start from ``x_T = sigma(t_max) z`` (the ``alpha(t_max) x_0`` part is taken as negligible,
as it is for the schedules' defaults) and end at ``t_min`` with the model's denoised ``x0_hat``
(``denoise=True``) or with ``x_{t_min}``.
"""

from __future__ import annotations

import torch

from .losses import Model, _check_prediction
from .schedules import NoiseSchedule, check_samples, expand_like

__all__ = ["predict_eps_x0", "sample_ode", "sample_ancestral"]


def predict_eps_x0(
    model: Model, x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps_hat, x0_hat)`` at ``(x, t)`` from a model predicting ``prediction``; ``t`` has shape ``[B]``."""
    _check_prediction(prediction)
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = expand_like(alpha.to(x.dtype), x), expand_like(sigma.to(x.dtype), x)
    out = model(x, t)
    if out.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if prediction == "eps":
        eps = out
    elif prediction == "x0":
        return (x - a * out) / s, out
    elif prediction == "v":
        eps = (s * x + a * out) / (a * a + s * s)
    else:
        eps = -s * out
    return eps, (x - s * eps) / a


def _start(shape, schedule: NoiseSchedule, steps: int, generator, device, x_T, model, prediction):
    _check_prediction(prediction)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be a tuple of positive ints (batch, features...), got {shape!r}")
    times = schedule.time_grid(steps, device=device)
    if x_T is not None:
        check_samples(x_T, "x_T", model, "model")
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}")
    else:
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        dtype = param.dtype if param is not None else torch.float32
        x_T = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        x_T = x_T * schedule.sigma(times[:1]).to(device)
    return times, x_T


def _progress(iterable, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


@torch.no_grad()
def sample_ode(
    model: Model,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    steps: int = 50,
    method: str = "heun",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    denoise: bool = True,
    show_progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``t_max`` to ``t_min`` in ``steps`` steps (``"heun"`` or ``"euler"``).

    Heun costs two model calls per step (one on the last), Euler one.
    """
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
    times, x = _start(shape, schedule, steps, generator, device, x_T, model, prediction)
    batch = x.shape[0]
    for i in _progress(range(steps), show_progress, "sampling (ODE)"):
        t, t_next = times[i].expand(batch), times[i + 1].expand(batch)
        a, s = schedule.alpha_sigma(t)
        a_next, s_next = schedule.alpha_sigma(t_next)
        dlam = expand_like((s_next / a_next - s / a).to(x.dtype), x)
        y, scale_next = x / expand_like(a.to(x.dtype), x), expand_like(a_next.to(x.dtype), x)
        eps, _ = predict_eps_x0(model, x, t, schedule, prediction)
        x_next = scale_next * (y + dlam * eps)
        if method == "heun":
            eps_next, _ = predict_eps_x0(model, x_next, t_next, schedule, prediction)
            x_next = scale_next * (y + dlam * 0.5 * (eps + eps_next))
        x = x_next
    if denoise:
        _, x0_hat = predict_eps_x0(model, x, times[-1].expand(batch), schedule, prediction)
        return x0_hat
    return x


@torch.no_grad()
def sample_ancestral(
    model: Model,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    steps: int = 100,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    denoise: bool = True,
    show_progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling: ``steps`` draws from the forward process's posterior given the model's ``x0_hat``."""
    times, x = _start(shape, schedule, steps, generator, device, x_T, model, prediction)
    batch = x.shape[0]
    for i in _progress(range(steps), show_progress, "sampling (ancestral)"):
        t, s_time = times[i].expand(batch), times[i + 1].expand(batch)
        _, x0_hat = predict_eps_x0(model, x, t, schedule, prediction)
        a_t, s_t = schedule.alpha_sigma(t)
        a_s, s_s = schedule.alpha_sigma(s_time)
        a_ts = a_t / a_s
        var_ts = torch.clamp(s_t**2 - a_ts**2 * s_s**2, min=0.0)
        mean = (expand_like((a_ts * s_s**2 / s_t**2).to(x.dtype), x) * x
                + expand_like((a_s * var_ts / s_t**2).to(x.dtype), x) * x0_hat)
        std = expand_like(torch.sqrt(var_ts * s_s**2 / s_t**2).to(x.dtype), x)
        x = mean + std * torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    if denoise:
        _, x0_hat = predict_eps_x0(model, x, times[-1].expand(batch), schedule, prediction)
        return x0_hat
    return x
