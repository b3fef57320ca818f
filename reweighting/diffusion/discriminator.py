"""Training the time-dependent discriminator ``d(x_t, t)`` behind TIW-DSM's ratio (docs/methods/tiw-dsm.md).

Reference samples (from ``p_data``) are class 1 and biased samples class 0. Both are noised with
the score model's schedule and time sampler, and the two classes get equal weight in the
binary cross-entropy whatever their sizes, so that at the optimum
``logit(x_t, t) = log p_data^t(x_t) - log p_bias^t(x_t)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_count, check_positive_number
from .schedules import NoiseSchedule, check_samples

__all__ = ["TimeDependentDiscriminator", "DiscriminatorFit", "balanced_bce", "train_discriminator"]


class TimeDependentDiscriminator(nn.Module):
    """Wraps ``net(x_t, t)`` (any output of one value per sample) into a logit of shape ``[B]``.

    ``time_transform`` maps the schedule's ``t`` to what ``net`` expects (for example the log of
    EDM's noise level). ``probability(x_t, t)`` is ``d = sigmoid(logit)``.
    """

    def __init__(self, net: nn.Module, time_transform=None) -> None:
        super().__init__()
        self.net = net
        self.time_transform = time_transform

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x_t, self.time_transform(t) if self.time_transform is not None else t)
        if out.dim() == 2 and out.shape[1] == 1:
            out = out.squeeze(1)
        if out.shape != (x_t.shape[0],):
            raise ValueError(f"net must return one logit per sample (shape [{x_t.shape[0]}]), got {tuple(out.shape)}")
        return out

    def probability(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x_t, t))


def balanced_bce(logit_reference: torch.Tensor, logit_biased: torch.Tensor) -> torch.Tensor:
    """``(BCE(logit_ref, 1) + BCE(logit_bias, 0)) / 2``: each class counts half, whatever its size."""
    ref = F.binary_cross_entropy_with_logits(logit_reference, torch.ones_like(logit_reference))
    bias = F.binary_cross_entropy_with_logits(logit_biased, torch.zeros_like(logit_biased))
    return 0.5 * (ref + bias)


@dataclass
class DiscriminatorFit:
    """What :func:`train_discriminator` did: the best held-out loss and when, and the curve.

    ``history`` holds ``(step, mean training loss since the last evaluation, held-out loss)``.
    ``log(2) ~ 0.693`` is the loss of a discriminator that cannot tell the sets apart.
    """

    best_step: int
    best_holdout_loss: float
    steps_run: int
    stopped_early: bool
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _split(x: torch.Tensor, fraction: float, generator: torch.Generator, name: str) -> tuple[torch.Tensor, ...]:
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"{name} needs at least 2 samples to hold some out, got {n}")
    n_out = min(max(1, round(fraction * n)), n - 1)
    perm = torch.randperm(n, generator=generator)
    return x[perm[n_out:]], x[perm[:n_out]]


def _noised(schedule: NoiseSchedule, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = schedule.sample_time(x.shape[0], generator=generator).to(x.device)
    noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    x_t, _ = schedule.add_noise(x, t, noise)
    return x_t, t


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    return x.repeat(times, *[1] * (x.dim() - 1))


@torch.no_grad()
def _logits(discriminator: nn.Module, x_t: torch.Tensor, t: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([discriminator(x_t[i : i + chunk], t[i : i + chunk]).reshape(-1)
                      for i in range(0, x_t.shape[0], chunk)])


def train_discriminator(
    discriminator: nn.Module,
    reference: torch.Tensor,
    biased: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    holdout_fraction: float = 0.1,
    holdout_repeats: int = 8,
    eval_every: int = 100,
    patience: int = 5,
    min_steps: int = 0,
    ema: float | None = None,
    lr_decay: bool = False,
    generator: torch.Generator | None = None,
    show_progress: bool = True,
    desc: str = "discriminator",
) -> DiscriminatorFit:
    """Fit ``discriminator(x_t, t) -> logit [B]`` to tell noised reference samples (1) from biased ones (0).

    Each step draws ``batch_size / 2`` samples from each set (with replacement), noises them with
    ``schedule`` at times from ``schedule.sample_time``, and takes an Adam step on
    :func:`balanced_bce`. A share ``holdout_fraction`` of each set is held out, noised once at
    ``holdout_repeats`` fixed times per sample (so evaluations compare like with like), and
    scored every ``eval_every`` steps; after ``min_steps``, training stops once ``patience``
    evaluations have passed without improvement, and the best parameters are restored (a small
    held-out set is noisy early on, when a few unlucky evaluations would otherwise stop a run
    that has barely started). The discriminator is left in ``eval()`` mode.

    ``ema`` (for example 0.999) keeps an exponential moving average of the parameters, which is
    what gets evaluated, kept and returned; ``lr_decay`` anneals the learning rate to zero over
    ``steps`` (cosine). Both damp the optimiser's noise, which matters at high noise levels: there
    the log-ratio is small and smooth and the per-sample signal weak, so the parameters' jitter
    would otherwise swamp the input gradient ``grad_x log w_t`` that TIW-DSM's correction uses.
    """
    if not isinstance(discriminator, nn.Module):
        raise TypeError(f"discriminator must be a torch.nn.Module, got {type(discriminator).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule (VPLinear, VPCosine, VE, EDM), got "
                        f"{type(schedule).__name__}")
    param = next(discriminator.parameters(), None)
    if param is None:
        raise ValueError("discriminator has no parameters to train")
    for name, x in (("reference", reference), ("biased", biased)):
        # Any floating dtype is accepted and converted to the discriminator's (data are often
        # float64 from numpy or bfloat16); the values must be finite.
        check_samples(x, name)
    if reference.shape[1:] != biased.shape[1:]:
        raise ValueError(
            f"reference samples have shape {tuple(reference.shape[1:])} but biased ones {tuple(biased.shape[1:])}"
        )
    steps = check_count(steps, "steps", 1)
    batch_size = check_count(batch_size, "batch_size", 2)
    eval_every = check_count(eval_every, "eval_every", 1)
    patience = check_count(patience, "patience", 1)
    holdout_repeats = check_count(holdout_repeats, "holdout_repeats", 1)
    min_steps = check_count(min_steps, "min_steps", 0)
    check_positive_number(lr, "lr")
    if not (0.0 < holdout_fraction < 1.0):
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    if ema is not None and not (0.0 <= ema < 1.0):
        raise ValueError(f"ema must be in [0, 1) or None, got {ema!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(discriminator.parameters()).device
    ref_train, ref_out = _split(reference.detach().to(param.dtype), holdout_fraction, gen, "reference")
    bias_train, bias_out = _split(biased.detach().to(param.dtype), holdout_fraction, gen, "biased")
    ref_train, bias_train = ref_train.to(device), bias_train.to(device)
    ref_out_t, ref_out_time = _noised(schedule, _repeat(ref_out, holdout_repeats).to(device), gen)
    bias_out_t, bias_out_time = _noised(schedule, _repeat(bias_out, holdout_repeats).to(device), gen)

    # The model that is evaluated and returned: the EMA copy, or the trained network itself.
    averaged = copy.deepcopy(discriminator).requires_grad_(False) if ema is not None else discriminator

    def holdout_loss() -> float:
        averaged.eval()
        loss = float(balanced_bce(_logits(averaged, ref_out_t, ref_out_time).float(),
                                  _logits(averaged, bias_out_t, bias_out_time).float()))
        discriminator.train()
        if not math.isfinite(loss):
            raise ValueError(f"the discriminator's held-out loss is {loss} at step {step}: its logits are not finite "
                             "(the data are finite, so the network diverged; lower lr)")
        return loss

    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, weight_decay=weight_decay)
    schedule_lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0) if lr_decay else None
    half = batch_size // 2
    step = 0
    best = holdout_loss()
    best_step, best_state = 0, copy.deepcopy(averaged.state_dict())
    history: list[tuple[int, float, float]] = [(0, float("nan"), best)]
    since_best, running, count, step = 0, 0.0, 0, 0
    stopped = False
    discriminator.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(1, steps + 1), desc=desc, disable=not show_progress, leave=False, dynamic_ncols=True)
    for step in bar:
        i_ref = torch.randint(ref_train.shape[0], (half,), generator=gen).to(device)
        i_bias = torch.randint(bias_train.shape[0], (half,), generator=gen).to(device)
        xr, tr = _noised(schedule, ref_train[i_ref], gen)
        xb, tb = _noised(schedule, bias_train[i_bias], gen)
        logits = discriminator(torch.cat([xr, xb]), torch.cat([tr, tb])).reshape(-1)
        loss = balanced_bce(logits[:half], logits[half:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule_lr is not None:
            schedule_lr.step()
        if ema is not None:
            # warm-up, so that the average does not keep the random initialisation for long
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for avg, p in zip(averaged.parameters(), discriminator.parameters()):
                    avg.lerp_(p, 1 - decay)
                for avg, b in zip(averaged.buffers(), discriminator.buffers()):
                    avg.copy_(b)
        running, count = running + loss.detach().double(), count + 1  # a tensor: no host sync per step
        if step % eval_every == 0 or step == steps:
            held = holdout_loss()
            history.append((step, float(running) / count, held))
            running, count = 0.0, 0
            bar.set_postfix(holdout=f"{held:.4f}", best=f"{min(best, held):.4f}")
            if held < best:
                best, best_step, best_state, since_best = held, step, copy.deepcopy(averaged.state_dict()), 0
            else:
                since_best += 1
                if since_best >= patience and step >= min_steps:
                    stopped = True
                    break
    bar.close()
    discriminator.load_state_dict(best_state)
    discriminator.eval()
    return DiscriminatorFit(best_step=best_step, best_holdout_loss=best, steps_run=step, stopped_early=stopped,
                            history=history)
