"""Loss-based dynamic sample reweighting (Sow et al., ICLR 2025): METHODS.md section 1.

Per optimizer step, over the **global** batch (every data-parallel rank's samples):

1. ``h_i = normalize(l_i)`` onto ``[-delta, delta]`` (the paper's min-max, or a robust variant);
2. a score ``f(h_i)`` chosen by ``strategy``:

   ==============  ======================  =============================================
   strategy        ``f(h)``                 effect
   ==============  ======================  =============================================
   ``linupper``    ``min(h + delta, delta)``  ramps down the low-loss half; flat top
   ``quadratic``   ``1 - h^2 / delta^2``     down-weights both tails
   ``extremes``    ``|h|``                   up-weights both tails
   ``inverse``     ``-h``                    tilts toward low loss (a control, not a method)
   ``uniform``     constant                  the plain mean, exactly
   ==============  ======================  =============================================

3. ``w = softmax(f / r)`` with ``r = temperature`` (:func:`reweighting.tilt`), so
   ``max w / min w <= exp((max f - min f) / r)``: ``exp(delta / r)`` for linupper and extremes,
   ``exp(1 / r)`` for quadratic, ``exp(2 delta / r)`` for inverse;
4. loss ``sum_i w_i l_i`` (:func:`reweighting.weighted_loss`, correct under DDP's gradient averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from . import distributed as D
from .checks import check_batch, check_temperature, checks, checks_enabled, describe_indices
from .reduce import accumulate_weighted, weighted_loss
from .weights import WeightStats, normalize, tilt, weight_stats

__all__ = ["LossReweighter", "STRATEGIES", "LOSS_NORMALIZATIONS", "strategy_scores"]

STRATEGIES = ("linupper", "quadratic", "extremes", "inverse", "uniform")
LOSS_NORMALIZATIONS = ("minmax", "quantile", "rank")
ACCUMULATIONS = ("micro", "global")
NONFINITE_POLICIES = ("raise", "zero")


def strategy_scores(h: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """The score ``f(h)`` of METHODS.md section 1, step 2, for normalised losses ``h in [-delta, delta]``."""
    if strategy == "linupper":
        return torch.clamp(h + delta, max=delta)
    if strategy == "quadratic":
        return 1 - (h / delta) ** 2
    if strategy == "extremes":
        return h.abs()
    if strategy == "inverse":
        return -h
    if strategy == "uniform":
        return torch.zeros_like(h)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


class LossReweighter:
    """Weights each sample by ``softmax(f(h(l)) / temperature)`` over the global batch and returns ``sum_i w_i l_i``.

    Args:
        strategy: ``"linupper"``, ``"quadratic"``, ``"extremes"``, ``"uniform"`` (the plain mean),
            or ``"inverse"`` (tilts toward *low* loss; a control for studies).
        temperature: ``r`` in ``softmax(f / r)``, > 0. The paper uses 0.4 or 1.0. Smaller is sharper;
            the largest weight is at most ``exp(1 / r)`` times the smallest (with ``delta = 1``;
            ``exp(2 / r)`` for ``inverse``).
        delta: half-width of the normalised range ``[-delta, delta]``.
        warmup_steps: for the first ``warmup_steps`` optimizer steps the weights are uniform
            (the loss is the plain mean), or tilted with ``warmup_temperature`` if that is given.
        normalize: how losses are mapped onto ``[-delta, delta]``:
            ``"minmax"`` (the paper's) uses the batch's extreme losses, so one outlier (say a
            corrupted sample with a huge loss) squashes every other sample to ``-delta`` and
            LinUpper then gives the outlier the top weight. Use it to reproduce the paper on clean,
            deduplicated data. ``"quantile"`` maps the 5 % to 95 % quantile range onto the interval
            and clips the rest, so up to 5 % of outliers at either end change nothing else (this needs
            a global batch of more than ~20 samples, or the quantile itself reaches the outlier);
            ``"rank"`` uses ranks and ignores loss magnitudes altogether. Prefer one of these on
            web-scale or noisy data, or when the loss distribution has a long tail. Both gather the
            global batch's losses (one small host sync per step).
        accumulation: ``"micro"`` (the paper's behaviour) normalises over each micro-batch;
            ``"global"`` normalises over the whole gradient-accumulation window (see :meth:`accumulate`).
        nonfinite: ``"raise"`` (default): a NaN or infinite loss raises ``ValueError`` naming the
            sample indices, on every rank. ``"zero"``: such samples get weight 0, are left out of the
            normalisation and of the returned loss, and are counted in ``stats.n_nonfinite``.
        warmup_temperature: if given, warm-up uses the strategy at this (large) temperature instead
            of uniform weights (the paper's alternative, e.g. 100).
        group: the ``torch.distributed`` process group of the data-parallel ranks (default: all).

    ``rw(per_sample_loss)`` returns the weighted loss (a float32 scalar with a graph);
    ``rw.weights(per_sample_loss)`` the detached float32 weights of this rank's samples (they sum
    to 1 over all ranks); ``rw.stats`` the :class:`~reweighting.WeightStats` of the last weights
    (effective sample size, entropy, max/min ratio, non-finite count), identical on every rank.

    **The step counter** counts optimizer steps; it drives warm-up and is all the state there is.
    Call ``rw.step()`` once after each ``optimizer.step()``, or ``rw.attach(optimizer)`` once to
    have the optimizer call it. Save ``rw.state_dict()`` with the model and optimizer.

    **In a DDP loop** (``torchrun``; the same code runs unchanged in one process)::

        rw = LossReweighter("linupper", temperature=0.4, warmup_steps=1000)
        for batch in loader:                                  # this rank's share of the batch
            per_sample = sequence_loss(model.token_losses(batch), mask)   # [B_local], with graph
            rw(per_sample).backward()   # weights over all ranks; DDP's mean of gradients is
            optimizer.step()            # exactly sum_i w_i grad l_i over the global batch
            optimizer.zero_grad()
            rw.step()

    The returned value on each rank is ``world_size * sum_{i on this rank} w_i l_i`` so that DDP's
    averaging gives the global weighted sum; per-rank batch sizes may differ. The average of the
    values over ranks is the global weighted loss (log ``loss`` reduced with a mean, as usual).
    Every rank must call ``rw(...)`` (it runs collectives).

    **With gradient accumulation** over ``K`` micro-batches:

    - ``accumulation="micro"`` (paper): weights per micro-batch; divide by ``K`` as for a mean::

          for k, mb in enumerate(micro_batches):
              with model.no_sync() if k < K - 1 else nullcontext():
                  (rw(loss_fn(mb)) / K).backward()

    - ``accumulation="global"`` (exact: the gradient equals one step on the concatenated window)::

          rw = LossReweighter("linupper", accumulation="global")
          loss = rw.accumulate(micro_batches, loss_fn, no_sync=model.no_sync)   # runs backward
          optimizer.step(); optimizer.zero_grad(); rw.step()

      It costs one extra forward pass per micro-batch without stored activations (about a third of
      a training step) and no extra memory: the losses of the window are computed first under
      ``no_grad``, weighted together, then recomputed with a graph (dropout replayed identically).
      ``rw.accumulate`` also works with ``"micro"`` (no extra pass), so switching is one argument.
      In ``"global"`` mode ``rw(...)`` treats its input as the whole window, and calling it twice
      without ``rw.step()`` in between raises, since that would silently normalise per micro-batch.
    """

    def __init__(
        self,
        strategy: str = "linupper",
        temperature: float = 0.4,
        delta: float = 1.0,
        warmup_steps: int = 0,
        normalize: str = "minmax",
        accumulation: str = "micro",
        *,
        nonfinite: str = "raise",
        warmup_temperature: float | None = None,
        group=None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        check_temperature(temperature, "temperature")
        if warmup_temperature is not None:
            check_temperature(warmup_temperature, "warmup_temperature")
        if not (float(delta) > 0 and float(delta) != float("inf")):
            raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if normalize not in LOSS_NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {LOSS_NORMALIZATIONS}, got {normalize!r}")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.strategy = strategy
        self.temperature = float(temperature)
        self.delta = float(delta)
        self.warmup_steps = int(warmup_steps)
        self.normalize = normalize
        self.accumulation = accumulation
        self.nonfinite = nonfinite
        self.warmup_temperature = None if warmup_temperature is None else float(warmup_temperature)
        self.group = group
        self.num_steps = 0
        self.stats: WeightStats | None = None
        self._calls_since_step = 0

    def __repr__(self) -> str:
        return (
            f"LossReweighter(strategy={self.strategy!r}, temperature={self.temperature}, delta={self.delta}, "
            f"warmup_steps={self.warmup_steps}, normalize={self.normalize!r}, "
            f"accumulation={self.accumulation!r}, nonfinite={self.nonfinite!r}, step={self.num_steps})"
        )

    # ----------------------------------------------------------------- the step counter
    @property
    def in_warmup(self) -> bool:
        """True while ``num_steps < warmup_steps``."""
        return self.num_steps < self.warmup_steps

    def step(self) -> None:
        """Advance the optimizer-step counter by one (call once per ``optimizer.step()``)."""
        self.num_steps += 1
        self._calls_since_step = 0

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`step` after every ``optimizer.step()``; returns the hook's removable handle."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

    def state_dict(self) -> dict[str, Any]:
        """The step counter (the weights depend on nothing else that persists between steps)."""
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter saved by :meth:`state_dict`."""
        steps = state.get("num_steps") if isinstance(state, dict) else None
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state must be a dict with an integer 'num_steps' >= 0, got {state!r}")
        self.num_steps = steps
        self._calls_since_step = 0

    # ----------------------------------------------------------------- weights and loss
    def _is_uniform(self) -> bool:
        return self.strategy == "uniform" or (self.in_warmup and self.warmup_temperature is None)

    def _finite_mask(self, values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The mask of samples that take part (None: all), and this rank's count of non-finite losses."""
        bad = ~torch.isfinite(values)
        if self.nonfinite == "zero":
            return ~bad, bad.sum()
        if checks_enabled():
            # Agree on failure across ranks first, so that every rank raises instead of one raising
            # while the others wait in a collective.
            if bool(D.all_reduce_sum(bad.sum().float(), self.group) > 0):
                if not bool(bad.any()):
                    raise ValueError("per_sample_loss has NaN or infinite values on another rank")
                kinds = [k for k, m in (("NaN", torch.isnan(values)), ("infinite", torch.isinf(values)))
                         if bool(m.any())]
                where = f" on rank {D.rank(self.group)}" if D.is_distributed(self.group) else ""
                raise ValueError(
                    f"per_sample_loss has {' and '.join(kinds)} values at sample indices "
                    f"{describe_indices(bad)}{where} (pass nonfinite='zero' to give them weight 0 instead)"
                )
        return None, bad.sum()

    def _weights_and_mask(self, per_sample_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(per_sample_loss, torch.Tensor):
            raise TypeError(f"per_sample_loss must be a torch.Tensor, got {type(per_sample_loss).__name__}")
        if not D.is_distributed(self.group):
            check_batch(per_sample_loss, "per_sample_loss")
        elif per_sample_loss.dim() != 1:
            raise ValueError(f"per_sample_loss must be 1-d (one value per sample), got shape "
                             f"{tuple(per_sample_loss.shape)}")
        values = per_sample_loss.detach().float()
        mask, n_nonfinite = self._finite_mask(values)
        if mask is not None:
            values = torch.where(mask, values, torch.zeros_like(values))
        if self._is_uniform():
            ones = torch.ones_like(values) if mask is None else mask.float()
            weights = ones / D.global_count(ones.sum(), values.device, self.group)
        else:
            temperature = self.warmup_temperature if self.in_warmup else self.temperature
            # Under "raise", _finite_mask has already checked every loss (agreed over ranks), and
            # finite losses give finite scores: skip the core's per-call re-checks (a host sync each).
            with checks(False) if mask is None else nullcontext():
                h = normalize(values, self.normalize, self.delta, mask=mask, group=self.group)
                scores = strategy_scores(h, self.strategy, self.delta)
                weights = tilt(scores, temperature, mask=mask, group=self.group)
        self.stats = weight_stats(weights, mask=mask, n_nonfinite=n_nonfinite, n_dropped=n_nonfinite,
                                  group=self.group)
        return weights, mask

    def weights(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Detached float32 weights of this rank's samples, summing to 1 over the global batch; sets ``stats``."""
        return self._weights_and_mask(per_sample_loss)[0]

    def __call__(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """The weighted loss ``sum_i w_i l_i`` over the global batch (see the class docstring for DDP).

        With uniform weights (``strategy="uniform"`` or warm-up) this is ``per_sample_loss.mean()``
        in one process and the global mean over ranks under ``torch.distributed``.
        """
        if self.accumulation == "global":
            if self._calls_since_step >= 1:
                raise RuntimeError(
                    "accumulation='global' needs the whole accumulation window in one call: use "
                    "rw.accumulate(micro_batches, loss_fn) for micro-batches, and call rw.step() after "
                    "each optimizer step"
                )
            self._calls_since_step += 1
        weights, mask = self._weights_and_mask(per_sample_loss)
        loss = per_sample_loss.float()
        if mask is not None:
            # where() (not multiplication by 0) so that a NaN loss cannot leak into the sum.
            loss = torch.where(mask, loss, torch.zeros_like(loss))
        if self._is_uniform():
            if not D.is_distributed(self.group) and mask is None:
                return loss.mean()
            count = self.stats.n  # samples that took part, over all ranks
            return loss.sum() * (D.world_size(self.group) / count)
        return weighted_loss(loss, weights, group=self.group)

    def accumulate(
        self,
        micro_batches: Sequence[Any],
        per_sample_loss_fn: Callable[[Any], torch.Tensor],
        *,
        no_sync: Callable[[], Any] | None = None,
    ) -> torch.Tensor:
        """Run the backward pass of one gradient-accumulation window; returns its loss (detached, for logging).

        ``per_sample_loss_fn(mb)`` returns the per-sample losses of micro-batch ``mb`` with a graph.
        Pass ``no_sync=model.no_sync`` under DDP so gradients are all-reduced once, on the last
        micro-batch. With ``accumulation="global"`` the weights are normalised over all
        micro-batches and ranks (:func:`reweighting.accumulate_weighted`; one extra forward per
        micro-batch); with ``"micro"`` each micro-batch is weighted on its own and its loss divided
        by the number of micro-batches (the paper). ``stats`` describes the window (``"global"``)
        or the last micro-batch (``"micro"``). The returned value is this rank's contribution,
        as for ``rw(...)``: its mean over ranks is the window's weighted loss.
        """
        if len(micro_batches) == 0:
            raise ValueError("micro_batches is empty: a window needs at least one micro-batch")
        if self.accumulation == "global":
            weights, losses = accumulate_weighted(micro_batches, per_sample_loss_fn, self.weights,
                                                  no_sync=no_sync, group=self.group)
            finite = torch.where(weights > 0, losses, torch.zeros_like(losses))
            return (weights * finite).sum() * D.world_size(self.group)
        total = torch.zeros(())
        last = len(micro_batches) - 1
        for k, mb in enumerate(micro_batches):
            context = no_sync() if (no_sync is not None and k < last) else nullcontext()
            with context:
                loss = self(per_sample_loss_fn(mb)) / len(micro_batches)
                loss.backward()
            total = total.to(loss.device) + loss.detach()
        return total
