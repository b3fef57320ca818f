"""Noise schedules of the forward diffusion ``x_t = alpha(t) x_0 + sigma(t) eps`` (docs/methods/tiw-dsm.md).

Each schedule gives ``alpha(t)``, ``sigma(t)``, the distribution of ``t`` used in training
(:meth:`NoiseSchedule.sample_time`) and a decreasing grid of times for sampling
(:meth:`NoiseSchedule.time_grid`, EDM's spacing of the noise-to-signal ratio ``sigma / alpha``).
The score model, the discriminator and the samplers all take ``t`` as the schedule defines it
(for :class:`EDM`, ``t`` is the noise level ``sigma`` itself).
Everything is computed in float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..checks import check_count, checks_enabled, describe_indices

__all__ = ["NoiseSchedule", "VPLinear", "VPCosine", "VE", "EDM", "SCHEDULES", "make_schedule", "check_samples"]


class NoiseSchedule(ABC):
    """``alpha(t)``, ``sigma(t)`` on ``[t_min, t_max]``, a training time sampler and a sampling grid."""

    t_min: float
    t_max: float

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Signal scale ``alpha(t)``."""

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise scale ``sigma(t)``."""

    def sample_time(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``n`` training times, uniform on ``[t_min, t_max]`` unless the schedule says otherwise."""
        u = torch.rand(n, generator=generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u

    def time_grid(self, steps: int, *, rho: float = 7.0, device: torch.device | str | None = None) -> torch.Tensor:
        """``steps + 1`` times decreasing from ``t_max`` to ``t_min``, spaced as in EDM.

        The noise-to-signal ratio ``lambda = sigma / alpha`` follows Karras et al.'s grid
        ``(lambda_max^(1/rho) + i/n (lambda_min^(1/rho) - lambda_max^(1/rho)))^rho``, which puts
        most steps at low noise where samples get their detail; the times are found by bisection
        (``lambda`` increases with ``t``). ``rho = 1`` spaces ``lambda`` uniformly.
        """
        _check_steps(steps)
        ends = torch.tensor([self.t_max, self.t_min], dtype=torch.float64)
        lam_hi, lam_lo = (self.sigma(ends) / self.alpha(ends)).double().tolist()
        i = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        target = (lam_hi ** (1 / rho) + i * (lam_lo ** (1 / rho) - lam_hi ** (1 / rho))) ** rho
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = (self.sigma(mid) / self.alpha(mid)).double() > target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        grid = 0.5 * (lo + hi)
        grid[0], grid[-1] = self.t_max, self.t_min
        return grid.float().to(device)

    def check_time(self, t: torch.Tensor, name: str = "t") -> None:
        """Raise naming the samples where ``t`` is NaN or outside ``[t_min, t_max]`` (obeys ``set_checks``)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of times, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of times, got dtype {t.dtype}")
        if not checks_enabled():
            return
        lo, hi = float(self.t_min), float(self.t_max)
        slack = 1e-6 * max(1.0, abs(hi))  # float32 rounding of the bounds themselves
        tt = t.detach().double()
        bad = ~((tt >= lo - slack) & (tt <= hi + slack))  # also catches NaN
        if bool(bad.any()):
            values = tt.reshape(-1)[bad.reshape(-1)][:5].tolist()
            raise ValueError(f"{name} must lie in the schedule's range [t_min, t_max] = [{lo:g}, {hi:g}] "
                             f"({type(self).__name__}); got {values} at sample indices {describe_indices(bad)}")

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` in float32."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return self.alpha(t), self.sigma(t)

    def add_noise(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
        *, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, eps)`` with ``x_t = alpha(t) x0 + sigma(t) eps``; ``t`` ``[B]`` within ``[t_min, t_max]``."""
        self.check_time(t)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a, s = (v.to(x0.dtype) for v in self.alpha_sigma(t))
        return expand_like(a, x0) * x0 + expand_like(s, x0) * noise, noise


def check_samples(x: torch.Tensor, name: str, module: object = None, module_name: str = "model") -> None:
    """A floating-point batch ``[B, ...]`` with finite samples, matching ``module``'s parameter dtype and device.

    Non-finite samples are named by index (a host read; obeys ``set_checks``). A dtype or device
    other than the module's parameters' would otherwise fail deep inside it (``mat1 and mat2 must
    have the same dtype``); the error says which conversion is needed.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [batch, features...], got shape {tuple(x.shape)}")
    param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    if param is not None:
        if x.dtype != param.dtype:
            raise TypeError(f"{name} is {x.dtype} but the {module_name}'s parameters are {param.dtype}: convert one "
                            f"to the other (e.g. {name}.to({param.dtype}))")
        if x.device != param.device:
            raise ValueError(f"{name} is on {x.device} but the {module_name}'s parameters are on {param.device}")
    if checks_enabled() and x.shape[0] > 0:
        bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"{name} has NaN or infinite values in samples {describe_indices(bad)}")


def expand_like(per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` so that it scales each sample of ``x`` on its own."""
    if per_sample.dim() != 1 or per_sample.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected one value per sample (shape [{x.shape[0]}]), got shape {tuple(per_sample.shape)}"
        )
    return per_sample.reshape(-1, *([1] * (x.dim() - 1)))


def _check_steps(steps: int) -> None:
    check_count(steps, "steps", 1)


def _check_range(t_min: float, t_max: float) -> None:
    if not (0.0 <= t_min < t_max):
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")


@dataclass(frozen=True)
class VPLinear(NoiseSchedule):
    """Variance-preserving, linear ``beta`` (DDPM / score SDE).

    ``log alpha = -beta_min t / 2 - (beta_max - beta_min) t^2 / 4``,
    ``sigma = sqrt(1 - alpha^2)``; ``t`` uniform on ``[t_min, 1]``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self) -> None:
        _check_range(self.t_min, self.t_max)
        if not (0.0 <= self.beta_min <= self.beta_max):
            raise ValueError(f"need 0 <= beta_min <= beta_max, got {self.beta_min!r}, {self.beta_max!r}")

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t * t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_alpha(t.float()))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # -expm1(2 log alpha) = 1 - alpha^2 without cancellation at small t.
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t.float())))


@dataclass(frozen=True)
class VPCosine(NoiseSchedule):
    """Variance-preserving cosine schedule (Nichol & Dhariwal).

    ``alpha = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s))``,
    ``sigma = sqrt(1 - alpha^2)``. ``t_max`` stays below 1, where ``alpha`` reaches 0 and the
    ``x_0`` and ``v`` parameterisations divide by it.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.999

    def __post_init__(self) -> None:
        _check_range(self.t_min, self.t_max)
        if self.t_max >= 1.0:
            raise ValueError(f"t_max must be < 1 for the cosine schedule (alpha(1) = 0), got {self.t_max!r}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        half_pi = math.pi / 2
        return torch.cos(half_pi * (t.float() + self.s) / (1 + self.s)) / math.cos(half_pi * self.s / (1 + self.s))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.clamp(1 - self.alpha(t) ** 2, min=0.0))


@dataclass(frozen=True)
class VE(NoiseSchedule):
    """Variance-exploding (NCSN / score SDE).

    ``alpha = 1``, ``sigma = sigma_min (sigma_max / sigma_min)^t``, ``t`` uniform on ``[t_min, 1]``.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        _check_range(self.t_min, self.t_max)
        if not (0.0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t, dtype=torch.float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t.float()


@dataclass(frozen=True)
class EDM(NoiseSchedule):
    """Karras et al. (EDM): ``t`` is the noise level, ``alpha = 1``, ``sigma = t``.

    Training draws ``log sigma ~ N(p_mean, p_std^2)`` (clipped to ``[sigma_min, sigma_max]``);
    sampling uses the ``rho`` grid ``(sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not (0.0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t, dtype=torch.float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def sample_time(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return torch.exp(log_sigma).clamp(self.sigma_min, self.sigma_max)

    def time_grid(
        self, steps: int, *, rho: float | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        _check_steps(steps)
        rho = self.rho if rho is None else rho
        i = torch.linspace(0.0, 1.0, steps + 1, device=device)
        lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        return (hi + i * (lo - hi)) ** rho


SCHEDULES = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "ve": VE, "edm": EDM}


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """A schedule by name: one of :data:`SCHEDULES`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](**kwargs)
