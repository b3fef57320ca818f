"""Models and training of the ``tiw-dsm`` study: the configuration, the score model (an EDM-preconditioned
denoiser), the time samplers, the discriminator, sampling, and the learned ratio's error against the exact one.

Seed ``s`` draws the discriminator's initialisation and batches, the score model's initialisation,
batches, times and noise, and the sampler's noise from generators of its own; the methods of one
seed share the score model's initialisation and batch order (paired).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..diffusion.schedules import NoiseSchedule
from . import StudyContext, perturb_initial_weights
from .tiw_dsm_data import Dataset, ExactRingLogit

__all__ = ["Config", "FULL", "QUICK", "SMOKE", "TIME_SAMPLERS", "PARAMETERISATIONS", "make_study_schedule",
           "LogSNRTimes", "LogNormalTimes", "Preconditioned", "LogNoiseRatio", "FourierMLP", "make_score_model",
           "train_ratio", "exact_ratio", "train_score_model", "generate", "ratio_error_by_noise", "EXACT"]

# TIW-DSM trained with the exact time-dependent ratio instead of the learned one (a diagnostic)
EXACT = "TIW-DSM (exact ratio)"


@dataclass(frozen=True)
class Config:
    # rings
    ring_modes: int = 8
    ring_biased: int = 10_000
    ring_circle_radius: float = 1.2
    ring_radius: float = 0.3
    ring_width: float = 0.02
    schedule: str = "vp-cosine"
    # "x0": every method trains a denoiser with EDM's preconditioning (:class:`Preconditioned`) and
    # loss weight; "eps": the plain network predicts eps with the unweighted loss. With "eps" only
    # ~30% of DSM(obs)'s samples landed on a ring (1500 steps), with "x0" and the Fourier features
    # below 97% (3000 steps): the thin rings need the denoiser to be accurate to about a ring width
    # between sigma / alpha = 0.01 and 0.3, which the unscaled input and eps target did not reach.
    prediction: str = "x0"
    sigma_data: float = 0.8  # the rings' per-coordinate standard deviation (EDM's sigma_data)
    # Random Fourier features [sin(B u), cos(B u)] of the rings' (scaled) input u, B ~ N(0, scale^2):
    # a thin ring is a sharp function of x, which a plain MLP on x learns slowly (spectral bias).
    fourier_features: int = 64
    fourier_scale: float = 4.0
    # EDM's log-normal training sampler of log(sigma / alpha) ("log-normal" time sampler)
    p_mean: float = -2.0
    p_std: float = 1.4
    imbalance: float = 10.0  # head / tail proportion of the biased set
    reference_share: float = 0.05  # reference set size / biased set size (the paper's 5%)
    # 2000 steps put 97% of DSM(obs)'s samples on a ring in a pilot (4000 before: 97.8%), at half the cost
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    hidden: int = 128
    depth: int = 3
    digits_hidden: int = 256  # a score model on 64-dimensional data (no Fourier features)
    ema: float = 0.999
    disc_steps: int = 2000  # the discriminator of a small reference set (< 200 points)
    ring_disc_steps: int = 1500
    disc_hidden: int = 128
    clip: float = 20.0
    sample_steps: int = 25
    samples: int = 4000
    # Training-time sampler of the score model: "log-normal" (p_mean, p_std above), "uniform-t" (the
    # schedule's own) or "log-snr" (log(sigma / alpha) uniform between the schedule's ends). The
    # discriminator always trains at uniform t: its correction matters most at high noise.
    time_sampler: str = "log-normal"


FULL = Config()
QUICK = Config(steps=1500, ring_disc_steps=1000, disc_steps=1000, samples=2000, ring_biased=6000)
# The smallest configuration that runs every code path (the test suite's smoke test).
SMOKE = Config(steps=30, batch=64, hidden=32, depth=2, disc_steps=30, ring_disc_steps=30, disc_hidden=16,
               sample_steps=3, samples=200, ring_biased=800)
TIME_SAMPLERS = ("uniform-t", "log-snr", "log-normal")
PARAMETERISATIONS = ("x0", "eps")


def make_study_schedule(cfg: Config):
    """The VP schedule of ``cfg.schedule`` with the training-time sampler ``cfg.time_sampler``."""
    from ..diffusion import make_schedule

    if cfg.time_sampler not in TIME_SAMPLERS:
        raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS}, got {cfg.time_sampler!r}")
    if cfg.prediction not in PARAMETERISATIONS:
        raise ValueError(f"prediction must be one of {PARAMETERISATIONS}, got {cfg.prediction!r}")
    base = make_schedule(cfg.schedule)
    if cfg.time_sampler == "log-normal":
        return LogNormalTimes(base, cfg.p_mean, cfg.p_std)
    return base if cfg.time_sampler == "uniform-t" else LogSNRTimes(base)


class LogSNRTimes(NoiseSchedule):
    """A schedule whose training times have ``log(sigma / alpha)`` uniform between its ends.

    Everything but :meth:`sample_time` is the wrapped schedule's. ``t`` is found from a log-SNR by
    interpolating a fine table of ``(log(sigma / alpha)(t), t)`` (``sigma / alpha`` increases with
    ``t``), so any VP schedule works and a training step pays one ``searchsorted``.
    """

    def __init__(self, base, table: int = 8193) -> None:
        self.base = base
        t = torch.linspace(base.t_min, base.t_max, table, dtype=torch.float64)
        alpha, sigma = base.alpha_sigma(t)
        self.table_t = t
        self.table_log_ratio = torch.log(sigma.double() / alpha.double())
        if not bool((self.table_log_ratio.diff() > 0).all()):
            raise ValueError("LogSNRTimes needs sigma / alpha strictly increasing in t on [t_min, t_max]")
        self.log_ratio_ends = self.table_log_ratio[[0, -1]]

    def __getattr__(self, name: str):
        # only called for attributes this object lacks; "base" itself must not recurse (copy / pickle
        # build the object without __init__)
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # A NoiseSchedule (the losses check for one) whose every part but the time sampler is the base's.
    t_min = property(lambda self: self.base.t_min)
    t_max = property(lambda self: self.base.t_max)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.alpha(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.sigma(t)

    def time_grid(self, steps: int, **kwargs) -> torch.Tensor:
        return self.base.time_grid(steps, **kwargs)

    def time_for_log_ratio(self, target: torch.Tensor) -> torch.Tensor:
        """The time whose ``log(sigma / alpha)`` is ``target`` (clamped to the schedule's range)."""
        lam, t = self.table_log_ratio, self.table_t
        target = target.double().clamp(float(lam[0]), float(lam[-1]))
        hi = torch.searchsorted(lam, target).clamp(1, lam.numel() - 1)
        lo = hi - 1
        frac = (target - lam[lo]) / (lam[hi] - lam[lo])
        return (t[lo] + frac * (t[hi] - t[lo])).float()

    def sample_time(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        lo, hi = self.log_ratio_ends.tolist()
        return self.time_for_log_ratio(lo + (hi - lo) * u).to(device)


class LogNormalTimes(LogSNRTimes):
    """A schedule whose training times have ``log(sigma / alpha) ~ N(p_mean, p_std^2)`` (EDM's sampler).

    ``sigma / alpha`` is the noise level of ``x_t / alpha = x_0 + (sigma / alpha) eps``, EDM's
    ``sigma``; draws outside the schedule's range are clamped to its ends.
    """

    def __init__(self, base, p_mean: float, p_std: float, table: int = 8193) -> None:
        super().__init__(base, table)
        if not (p_std > 0 and math.isfinite(p_mean) and math.isfinite(p_std)):
            raise ValueError(f"need a finite p_mean and p_std > 0, got p_mean={p_mean!r}, p_std={p_std!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample_time(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return self.time_for_log_ratio(self.p_mean + self.p_std * z).to(device)


class Preconditioned(torch.nn.Module):
    """A denoiser ``D(x_t, t) ~ E[x_0 | x_t]`` (``x0``-prediction) with EDM's preconditioning on a VP schedule.

    With ``y = x_t / alpha = x_0 + s eps`` and ``s = sigma / alpha`` (Karras et al. 2022):
    ``D = c_skip y + c_out F(c_in y, log(s) / 4)``, ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)`` (``sd``: the data's standard
    deviation). The network's input and its regression target ``(x_0 - c_skip y) / c_out`` then
    have unit variance at every noise level; :meth:`loss_weight` is ``1 / c_out^2`` in ``x_0``
    units, so that the ``x0`` loss is ``|F - target|^2``.
    """

    def __init__(self, net: torch.nn.Module, schedule, sigma_data: float) -> None:
        super().__init__()
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.net, self.schedule, self.sigma_data = net, schedule, float(sigma_data)

    def _noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return alpha, sigma / alpha

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from ..diffusion import expand_like

        alpha, s = self._noise(t)
        sd2 = self.sigma_data**2
        norm = torch.sqrt(s * s + sd2)
        y = x / expand_like(alpha.to(x.dtype), x)
        coefficients = (sd2 / norm**2, s * self.sigma_data / norm, 1 / norm)
        c_skip, c_out, c_in = (expand_like(c.to(x.dtype), x) for c in coefficients)
        return c_skip * y + c_out * self.net(c_in * y, torch.log(s) / 4)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``1 / c_out^2 = (s^2 + sd^2) / (s sd)^2``, shape ``[B]``."""
        _, s = self._noise(t)
        return (s * s + self.sigma_data**2) / (s * self.sigma_data) ** 2



class LogNoiseRatio:
    """``t -> log(sigma(t) / alpha(t)) / 4``: the networks' time input, of order one over the whole schedule."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return torch.log(sigma / alpha) / 4


def train_ratio(data: Dataset, cfg: Config, seed: int, ctx: StudyContext, schedule):
    from ..diffusion import TimeDependentDiscriminator, TimeDependentRatio, TimeMLP, train_discriminator

    dim = data.biased.shape[1]
    torch.manual_seed(40_000 + seed)
    # A small reference set needs a small, strongly regularised discriminator.
    small = data.reference.shape[0] < 200
    net = TimeMLP(dim, 1, hidden=64 if small else cfg.disc_hidden, depth=2 if small else 3, squeeze=True)
    perturb_initial_weights(net)
    disc = TimeDependentDiscriminator(net, time_transform=LogNoiseRatio(schedule)).to(ctx.device)
    if small:
        steps, options = cfg.disc_steps, dict(batch_size=256, lr=3e-4, weight_decay=1e-2, holdout_fraction=0.2,
                                              holdout_repeats=16, eval_every=max(10, cfg.disc_steps // 60),
                                              patience=30)
    else:
        # The correction uses grad_x log w_t, which at high noise is small and smooth and learned from a
        # weak per-sample signal: large batches (noised pairs are free), a cosine-annealed learning rate
        # and an EMA of the weights keep the optimiser's noise from swamping it.
        steps, options = cfg.ring_disc_steps, dict(batch_size=1024, lr=3e-3, weight_decay=1e-4, holdout_fraction=0.1,
                                                   holdout_repeats=8, eval_every=max(10, cfg.ring_disc_steps // 40),
                                                   patience=10, ema=0.999, lr_decay=True)
    fit = train_discriminator(
        disc, data.reference.to(ctx.device), data.biased.to(ctx.device), schedule, steps=steps, min_steps=steps // 2,
        generator=torch.Generator().manual_seed(50_000 + seed), show_progress=ctx.show_progress,
        desc=f"{data.name} discriminator (seed {seed})", **options,
    )
    n_ref, n_bias = data.reference.shape[0], data.biased.shape[0]
    ratio = TimeDependentRatio(disc, reference_fraction=n_ref / (n_ref + n_bias), clip=cfg.clip)
    return ratio, fit


class FourierMLP(torch.nn.Module):
    """``F(u, c)``: a :class:`TimeMLP` on ``[u, sin(B u), cos(B u)]`` with a fixed ``B ~ N(0, scale^2)``."""

    def __init__(self, dim: int, features: int, scale: float, seed: int, **mlp) -> None:
        from ..diffusion import TimeMLP

        super().__init__()
        g = torch.Generator().manual_seed(65_000 + seed)
        self.register_buffer("B", scale * torch.randn(dim, features, generator=g))
        self.mlp = TimeMLP(dim + 2 * features, dim, **mlp)

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = u @ self.B
        return self.mlp(torch.cat([u, torch.sin(z), torch.cos(z)], dim=1), c)


def make_score_model(cfg: Config, dim: int, schedule, seed: int) -> torch.nn.Module:
    """The score model every method of a data set trains: ``prediction="x0"``, a :class:`Preconditioned`
    denoiser (on the rings its network has Fourier features of its input); ``"eps"``, a plain
    :class:`TimeMLP` predicting eps."""
    from ..diffusion import TimeMLP

    hidden = cfg.hidden if dim <= 2 else cfg.digits_hidden
    if cfg.prediction == "eps":
        return TimeMLP(dim, hidden=hidden, depth=cfg.depth, time_transform=LogNoiseRatio(schedule))
    if dim <= 2 and cfg.fourier_features > 0:
        net = FourierMLP(dim, cfg.fourier_features, cfg.fourier_scale, seed, hidden=hidden, depth=cfg.depth)
    else:
        net = TimeMLP(dim, hidden=hidden, depth=cfg.depth)
    return Preconditioned(net, schedule, cfg.sigma_data)


def train_score_model(method: str, data: Dataset, ratio, cfg: Config, seed: int, ctx: StudyContext, schedule):
    """Train with ``method`` (DSM(ref), DSM(obs), IW-DSM, TIW-DSM, weighting-only, correction-only, or
    ``EXACT``: TIW-DSM with the ratio given); returns the EMA model."""
    from ..diffusion import dsm_loss, iw_dsm_loss, tiw_dsm_loss

    label, method = method, ("TIW-DSM" if method == EXACT else method)

    device = ctx.device
    stream = data.reference if method == "DSM(ref)" else torch.cat([data.biased, data.reference])
    stream = stream.to(device)
    dim = stream.shape[1]
    torch.manual_seed(60_000 + seed)  # the same initialisation for every method
    model = perturb_initial_weights(make_score_model(cfg, dim, schedule, seed)).to(device)
    loss_weight = model.loss_weight if isinstance(model, Preconditioned) else None
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.05 * cfg.lr)
    g = torch.Generator().manual_seed(70_000 + seed)

    def loss_fn(x0):
        if method in ("DSM(ref)", "DSM(obs)"):
            return dsm_loss(model, x0, schedule, prediction=cfg.prediction, generator=g, loss_weight=loss_weight)
        if method == "IW-DSM":
            return iw_dsm_loss(model, x0, schedule, ratio, prediction=cfg.prediction, generator=g,
                               loss_weight=loss_weight)
        reweight = method in ("TIW-DSM", "weighting-only")
        correct = method in ("TIW-DSM", "correction-only")
        # with prediction="x0" the correction enters the denoiser's target as (sigma^2 / alpha) g
        # (reweighting.diffusion.denoising_target)
        return tiw_dsm_loss(model, x0, schedule, ratio, prediction=cfg.prediction, reweight=reweight,
                            correct=correct, generator=g, loss_weight=loss_weight)

    for step in ctx.progress(range(cfg.steps), desc=f"{data.name} {label} (seed {seed})"):
        x0 = stream[torch.randint(stream.shape[0], (cfg.batch,), generator=g).to(device)]
        loss, _ = loss_fn(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_decay.step()
        # EMA with a warm-up, so that short runs do not average in their first, poor, steps
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for avg, p in zip(ema.parameters(), model.parameters()):
                avg.lerp_(p, 1 - decay)
    return ema.eval()


def generate(model, n: int, dim: int, cfg: Config, seed: int, schedule, device) -> torch.Tensor:
    from ..diffusion import sample_ode

    return sample_ode(model, (n, dim), schedule, prediction=cfg.prediction, steps=cfg.sample_steps, method="heun",
                      generator=torch.Generator().manual_seed(80_000 + seed), device=device).cpu()



def exact_ratio(cfg: Config, data: Dataset, schedule, device) -> torch.nn.Module:
    """The exact time-dependent ratio of ``data`` (:class:`ExactRingLogit`), with the observed stream's
    reference fraction, as a :class:`~reweighting.diffusion.TimeDependentRatio`."""
    from ..diffusion import TimeDependentRatio

    n_ref, n_bias = data.reference.shape[0], data.biased.shape[0]
    logit = ExactRingLogit(cfg, schedule, data.true_proportions, data.biased_proportions)
    return TimeDependentRatio(logit, reference_fraction=n_ref / (n_ref + n_bias), clip=cfg.clip).to(device)


def ratio_error_by_noise(ratio, exact, data: Dataset, schedule, device, sigmas=(0.03, 0.1, 0.3, 0.6, 0.9),
                         n: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """The learned ratio against the exact one, per noise level ``sigma``, over ``n`` observed points
    noised to that level.

    ``log_w_rmse``: ``sqrt(E (log w_learned - log w_exact)^2)``, the error of the weight (0: exact; the
    exact ``log w`` of the modes spans ``log(p_data / p_bias)``). TIW-DSM's correction is ``sigma grad
    log w_t`` in eps units: ``absolute`` ``E|sigma (g_learned - g_exact)|^2``, ``exact`` the exact
    correction's size ``E|sigma g_exact|^2`` and ``relative`` their ratio (NaN where the exact
    correction is ~0: at low noise the log-ratio is flat along each ring).
    """
    g = torch.Generator().manual_seed(90_000 + seed)
    stream = torch.cat([data.biased, data.reference])
    x0 = stream[torch.randint(stream.shape[0], (n,), generator=g)].to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    base = getattr(schedule, "base", schedule)
    out = {}
    for sigma in sigmas:
        # VP: sigma = sqrt(1 - alpha^2); the time with that sigma from the schedule's table of log(sigma / alpha)
        target = torch.tensor([math.log(sigma / math.sqrt(1 - sigma**2))], dtype=torch.float64)
        t = LogSNRTimes(base).time_for_log_ratio(target).to(device).expand(n)
        alpha, sig = base.alpha_sigma(t)
        x_t = alpha[:, None] * x0 + sig[:, None] * noise
        log_learned, learned = ratio.log_weight_and_grad(x_t, t)
        log_exact, truth = exact.log_weight_and_grad(x_t, t)
        num = float((sig[:, None] * (learned - truth)).pow(2).sum(1).mean())
        den = float((sig[:, None] * truth).pow(2).sum(1).mean())
        out[f"{sigma:g}"] = {"log_w_rmse": float((log_learned - log_exact).pow(2).mean().sqrt()),
                             "absolute": num, "exact": den, "relative": num / den if den > 1e-8 else float("nan")}
    return out
