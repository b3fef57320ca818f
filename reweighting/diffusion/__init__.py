"""Diffusion on biased data: time-dependent importance weighting (TIW-DSM, Kim et al., ICLR 2024).

See docs/methods/tiw-dsm.md.

A large biased set and a small unbiased reference set. A time-dependent discriminator gives the
density ratio ``w_t(x_t) = p_data^t / p_bias^t`` between the noised distributions; TIW-DSM
weights each sample's denoising loss by ``w_t`` and corrects its target by ``grad_x log w_t``.

- :mod:`.schedules`: ``VPLinear``, ``VPCosine``, ``VE``, ``EDM``: ``alpha(t)``, ``sigma(t)``, time sampler,
  sampling grid
- :mod:`.discriminator`: ``TimeDependentDiscriminator``, ``train_discriminator`` (balanced BCE, early stopping)
- :mod:`.ratio`: ``TimeDependentRatio``: ``log_weight``, ``log_weight_and_grad``
- :mod:`.losses`: ``dsm_loss``, ``iw_dsm_loss``, ``tiw_dsm_loss`` (``eps`` / ``x0`` / ``v`` / ``score``)
- :mod:`.sampling`: ``sample_ode`` (Heun, Euler), ``sample_ancestral``
- :mod:`.nets`: ``TimeMLP``, a small time-conditioned MLP for vectors
"""

from .discriminator import DiscriminatorFit, TimeDependentDiscriminator, balanced_bce, train_discriminator
from .losses import PREDICTIONS, correction_scale, denoising_target, dsm_loss, iw_dsm_loss, tiw_dsm_loss
from .nets import TimeMLP, fourier_time_features
from .ratio import TimeDependentRatio, log_ratio_from_logit
from .sampling import predict_eps_x0, sample_ancestral, sample_ode
from .schedules import EDM, SCHEDULES, VE, NoiseSchedule, VPCosine, VPLinear, expand_like, make_schedule

__all__ = [
    "EDM",
    "PREDICTIONS",
    "SCHEDULES",
    "VE",
    "DiscriminatorFit",
    "NoiseSchedule",
    "TimeDependentDiscriminator",
    "TimeDependentRatio",
    "TimeMLP",
    "VPCosine",
    "VPLinear",
    "balanced_bce",
    "correction_scale",
    "denoising_target",
    "dsm_loss",
    "expand_like",
    "fourier_time_features",
    "iw_dsm_loss",
    "log_ratio_from_logit",
    "make_schedule",
    "predict_eps_x0",
    "sample_ancestral",
    "sample_ode",
    "tiw_dsm_loss",
    "train_discriminator",
]
