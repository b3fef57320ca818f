"""Loss-based dynamic sample reweighting (Sow et al., ICLR 2025): docs/methods/loss-based.md.

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

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from . import distributed as D
from .checks import check_positive_number, check_temperature, checks, checks_enabled, describe_indices
from .reduce import accumulate_weighted, check_window
from .weights import WeightStats, normalize, weight_stats

__all__ = ["LossReweighter", "STRATEGIES", "LOSS_NORMALIZATIONS", "strategy_scores"]

STRATEGIES = ("linupper", "quadratic", "extremes", "inverse", "uniform")
LOSS_NORMALIZATIONS = ("minmax", "quantile", "rank")
ACCUMULATIONS = ("micro", "global")
NONFINITE_POLICIES = ("raise", "zero")


def strategy_scores(h: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """The score ``f(h)`` of docs/methods/loss-based.md, step 2, for normalised losses ``h in [-delta, delta]``."""
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


class _AttachHandle:
    """What :meth:`LossReweighter.attach` returns: ``remove()`` detaches the reweighter."""

    def __init__(self, owner: LossReweighter, hook: Any) -> None:
        self._owner, self._hook = owner, hook

    def remove(self) -> None:
        self._hook.remove()
        if self._owner._attached is self:
            self._owner._attached = None


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
            web-scale or noisy data, or when the loss distribution has a long tail. Every
            normalisation costs the same one gather per step under ``torch.distributed``.
        accumulation: ``"micro"`` (the paper's behaviour) normalises over each micro-batch;
            ``"global"`` normalises over the whole gradient-accumulation window (see :meth:`accumulate`).
        nonfinite: ``"raise"`` (default): a NaN or infinite loss raises ``ValueError`` naming the
            sample indices (and ranks), on every rank. ``"zero"``: such samples get weight 0, are
            left out of the normalisation and of the returned loss (``torch.where``, so the
            gradient reaching their ``per_sample_loss`` entry is exactly 0), and are counted in
            ``stats.n_nonfinite``. The parameters' gradient then equals that of the batch without
            them **when the non-finite value arises after the last op with a finite derivative**,
            e.g. ``sequence_loss(..., empty="nan")``. If it comes from upstream (a NaN or infinite
            input, target or activation, ``log(0)``, an fp16 overflow), autograd multiplies the 0
            reaching the loss by a non-finite local derivative, ``0 * NaN = NaN``, and no masking of
            the loss can undo that (the ``torch.where`` gradient trap). Then exclude the samples at
            the source: replace their inputs or targets by finite placeholders with ``torch.where``
            before the forward and pass ``mask=`` (see ``__call__``); or keep ``"raise"`` and skip
            the batch.
        warmup_temperature: if given, warm-up uses the strategy at this (large) temperature instead
            of uniform weights (the paper's alternative, e.g. 100).
        group: the ``torch.distributed`` process group of the data-parallel ranks (default: all).

    ``rw(per_sample_loss, mask=None)`` returns the weighted loss (a float32 scalar with a graph);
    ``rw.weights(per_sample_loss, mask=None)`` the detached float32 weights of this rank's samples
    (they sum to 1 over all ranks); ``rw.stats`` the :class:`~reweighting.WeightStats` of the last
    weights (effective sample size, entropy, max/min ratio, non-finite and masked counts),
    identical on every rank. ``mask`` (bool ``[B]``, True = takes part) excludes samples such as
    sequences with no labelled token: weight 0, no part in any statistic, any value allowed.

    **Cost under torch.distributed**: one collective per call, an ``all_gather`` of every rank's
    losses and exclusion flags (a few KB, with the per-rank sizes embedded), after which the
    normalisation, the NaN check and the statistics are computed locally, identically on every
    rank, for every ``normalize`` and policy. The gather's buffer holds 256 samples per rank at
    first, padded, with a mask of the real samples, so with checks off (``reweighting.checks(False)``)
    a step reads nothing back to the host. With checks on, the per-rank sizes are read back (one
    small host read) and a larger batch grows the buffer once (one extra gather, agreed by all
    ranks); with checks off a rank whose batch exceeds the buffer raises: run the first step with
    checks on, or set ``rw.gather_capacity`` to the largest per-rank batch.

    **The step counter** counts optimizer steps; it drives warm-up and is all the state there is.
    Call ``rw.step()`` once after each ``optimizer.step()``, or ``rw.attach(optimizer)`` once to
    have the optimizer call it (not both: ``step()`` while attached, or a second ``attach``,
    raises ``RuntimeError``, since either would count two steps per optimizer step). Save
    ``rw.state_dict()`` with the model and optimizer.

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
    Every rank must call ``rw(...)`` (it runs a collective).

    The same holds under FSDP2 (``fully_shard``), whose reduce-scatter also averages over ranks;
    its counterpart of ``model.no_sync()`` is a small context around
    ``model.set_requires_gradient_sync(False)`` / ``(True)``. Two set-ups break the averaging this
    relies on and would give a scaled gradient: gradients summed over ranks (for example
    ``set_gradient_divide_factor(1.0)``), and data parallelism combined with tensor or pipeline
    parallelism, where ``group=`` must be the data-parallel group, not the default world.

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
        check_positive_number(delta, "delta")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) \
                or int(warmup_steps) != warmup_steps or warmup_steps < 0:
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
        self._attached: _AttachHandle | None = None
        # Rows per rank of the one-collective gather (grown, identically on every rank, when a
        # batch is larger); not part of the state: a resumed run grows it again in one extra gather.
        self._capacity = 256

    @property
    def gather_capacity(self) -> int:
        """Samples per rank that the gather's buffer holds (grows with checks on; set it for checks off)."""
        return self._capacity

    @gather_capacity.setter
    def gather_capacity(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"gather_capacity must be an integer >= 1, got {value!r}")
        self._capacity = value

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

    def _advance(self) -> None:
        self.num_steps += 1
        self._calls_since_step = 0

    def step(self) -> None:
        """Advance the optimizer-step counter by one (call once per ``optimizer.step()``).

        Raises ``RuntimeError`` while :meth:`attach` is in force: the optimizer already advances
        the counter, and a second advance per step would end warm-up at half the intended steps.
        """
        if self._attached is not None:
            raise RuntimeError(
                "rw.step() was called while rw.attach(optimizer) is in force: the optimizer already "
                "advances the step counter, so this would count two steps per optimizer step; call "
                "one or the other (rw.detach() undoes attach)"
            )
        self._advance()

    def attach(self, optimizer: torch.optim.Optimizer) -> _AttachHandle:
        """Advance the step counter after every ``optimizer.step()``; returns a handle with ``remove()``.

        At most one optimizer at a time: attaching again (to the same or another optimizer)
        raises ``RuntimeError``, as does a manual :meth:`step` while attached. :meth:`detach` (or
        the handle's ``remove()``) undoes it.
        """
        if not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._attached is not None:
            raise RuntimeError(
                "this LossReweighter is already attached to an optimizer: a second attach would count "
                "two steps per optimizer step (call rw.detach() first to move it to another optimizer)"
            )
        self._attached = _AttachHandle(self, optimizer.register_step_post_hook(lambda *_: self._advance()))
        return self._attached

    def detach(self) -> None:
        """Undo :meth:`attach` (a no-op when not attached)."""
        if self._attached is not None:
            self._attached.remove()

    def state_dict(self) -> dict[str, Any]:
        """The step counter (the weights depend on nothing else that persists between steps)."""
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter saved by :meth:`state_dict`."""
        steps = state.get("num_steps") if isinstance(state, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state must be a dict with an integer 'num_steps' >= 0, got {state!r}")
        self.num_steps = steps
        self._calls_since_step = 0

    # ----------------------------------------------------------------- weights and loss
    def _is_uniform(self) -> bool:
        return self.strategy == "uniform" or (self.in_warmup and self.warmup_temperature is None)

    def _check_input(self, per_sample_loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if not isinstance(per_sample_loss, torch.Tensor):
            raise TypeError(f"per_sample_loss must be a torch.Tensor, got {type(per_sample_loss).__name__}")
        if not per_sample_loss.is_floating_point():
            raise TypeError("per_sample_loss must be a floating-point tensor (losses), got dtype "
                            f"{per_sample_loss.dtype}")
        if per_sample_loss.dim() != 1:
            raise ValueError(f"per_sample_loss must be 1-d (one value per sample), got shape "
                             f"{tuple(per_sample_loss.shape)}")
        if per_sample_loss.shape[0] == 0 and not D.is_distributed(self.group):
            raise ValueError("per_sample_loss is empty: a batch needs at least one sample")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor of booleans (True = take part), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = take part), got dtype {mask.dtype}")
        if mask.shape != per_sample_loss.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but per_sample_loss has "
                             f"{tuple(per_sample_loss.shape)}: one entry per sample is needed")
        if mask.device != per_sample_loss.device:
            raise ValueError(f"mask is on {mask.device} but per_sample_loss is on {per_sample_loss.device}")
        return mask

    def _nonfinite_error(self, bad: torch.Tensor, values: torch.Tensor, offset: int, n_local: int,
                         rank_sizes: list[int] | None) -> ValueError:
        """The error for non-finite losses (``bad`` and ``values`` over the gathered global batch)."""
        kinds = " and ".join(k for k, m in (("NaN", torch.isnan(values) & bad), ("infinite", torch.isinf(values) & bad))
                             if bool(m.any()))
        hint = " (pass nonfinite='zero' to give them weight 0 instead, or mask=... to exclude samples)"
        if rank_sizes is None:
            return ValueError(f"per_sample_loss has {kinds} values at sample indices {describe_indices(bad)}{hint}")
        mine = bad[offset : offset + n_local]
        places, start = [], 0
        for r, size in enumerate(rank_sizes):
            if bool(bad[start : start + size].any()):
                places.append(f"sample indices {describe_indices(bad[start : start + size])} on rank {r}")
            start += size
        if bool(mine.any()):
            return ValueError(f"per_sample_loss has {kinds} values at {'; '.join(places)}{hint}")
        return ValueError(f"per_sample_loss has {kinds} values on another rank: {'; '.join(places)}{hint}")

    def _weights_and_mask(
        self, per_sample_loss: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's weights, and this rank's mask of samples that take part (None: all)."""
        mask = self._check_input(per_sample_loss, mask)
        values = per_sample_loss.detach().float()
        n_local = values.shape[0]
        if D.is_distributed(self.group):
            # One collective: every rank's losses and exclusion flags (a few KB) in a padded buffer
            # with a validity mask, so nothing is read back to the host; everything below is computed
            # locally on the global batch, identically on every rank. This rank's samples start at
            # rank * capacity, and padding takes no part in anything.
            excluded = torch.zeros_like(values) if mask is None else (~mask).float()
            columns = torch.stack([values, excluded], dim=1)
            rows, valid, counts = D.gather_padded(columns, self._capacity, self.group, truncate=checks_enabled())
            if checks_enabled():
                largest = int(counts.max())  # a host read, allowed with checks on: grow on every rank alike
                if largest > self._capacity:
                    self._capacity = 1 << (largest - 1).bit_length()
                    rows, valid, counts = D.gather_padded(columns, self._capacity, self.group)
            offset = D.rank(self.group) * self._capacity
            everything = rows[:, 0].contiguous()
            taking_part = valid if mask is None else valid & (rows[:, 1] == 0)
        else:
            valid, offset, everything, taking_part = None, 0, values, mask
        finite = torch.isfinite(everything)
        bad = ~finite if taking_part is None else taking_part & ~finite
        if self.nonfinite == "zero":
            keep = finite if taking_part is None else taking_part & finite
        else:
            keep = taking_part  # None: every sample takes part
        if checks_enabled():
            any_bad, any_kept = torch.stack([bad.any(), torch.ones((), dtype=torch.bool) if keep is None
                                             else keep.any()]).tolist()  # one host read
            if self.nonfinite == "raise" and any_bad:
                raise self._nonfinite_error(bad, everything, offset, n_local,
                                            None if valid is None else [self._capacity] * len(counts))
            if not any_kept:
                n_masked = 0 if taking_part is None else int(((~taking_part) if valid is None
                                                               else (valid & ~taking_part)).sum())
                total = everything.shape[0] if valid is None else int(valid.sum())
                raise ValueError(
                    f"no sample of per_sample_loss is left to weight over the global batch of "
                    f"{total}: {n_masked} excluded by mask, {int(bad.sum())} non-finite"
                )
        weights = self._global_weights(everything, keep)
        if taking_part is None:
            n_masked = 0
        else:  # padding is not masking
            n_masked = ((~taking_part) if valid is None else (valid & ~taking_part)).sum()
        n_bad = bad.sum() if self.nonfinite == "zero" else 0
        with checks(False):  # the weights were made here: no host read to re-check them
            self.stats = weight_stats(weights, mask=keep, n_nonfinite=bad.sum(), n_dropped=n_masked + n_bad,
                                      n_masked=n_masked, group=D.LOCAL)
        mine = weights[offset : offset + n_local]
        return mine, (None if keep is None else keep[offset : offset + n_local])

    def _global_weights(self, values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Weights of the whole (gathered) batch: ``softmax(f(h(l)) / r)`` over the samples in ``keep``.

        Computed in this process only; the values are already checked (or masked by the policy),
        so the core's per-call checks are skipped. Min-max and the softmax are written out here
        (a handful of tensor ops) since this runs on every training step.
        """
        if self._is_uniform():
            ones = torch.ones_like(values) if keep is None else keep.float()
            return ones / ones.sum()
        temperature = self.warmup_temperature if self.in_warmup else self.temperature
        safe = values if keep is None else torch.where(keep, values, torch.zeros_like(values))
        if self.normalize == "minmax":
            if keep is None:
                lo, hi = torch.aminmax(safe)
            else:
                hi = torch.where(keep, safe, torch.full_like(safe, -math.inf)).amax()
                lo = torch.where(keep, safe, torch.full_like(safe, math.inf)).amin()
            # minmax_normalize's formula (eps = 1e-6 as there)
            h = self.delta * (2 * safe - hi - lo) / torch.clamp(hi - lo, min=1e-6)
        else:
            with checks(False):
                h = normalize(safe, self.normalize, self.delta, mask=keep, group=D.LOCAL)
        logits = strategy_scores(h, self.strategy, self.delta) / temperature
        if keep is not None:
            logits = torch.where(keep, logits, torch.full_like(logits, -math.inf))
        # tilt's formula: exp(s / r - max) / sum, the maximum taken over the included samples
        return torch.softmax(logits, dim=0)

    def weights(self, per_sample_loss: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Detached float32 weights of this rank's samples, summing to 1 over the global batch; sets ``stats``.

        ``mask`` (bool ``[B]``, True = takes part, optional) excludes samples, for example
        sequences with no labelled token: they get weight exactly 0, enter no statistic of the
        normalisation, may hold any value (NaN included) and are counted in ``stats.n_masked``.
        """
        return self._weights_and_mask(per_sample_loss, mask)[0]

    def __call__(self, per_sample_loss: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss ``sum_i w_i l_i`` over the global batch (see the class docstring for DDP).

        With uniform weights (``strategy="uniform"`` or warm-up) this is ``per_sample_loss.mean()``
        in one process and the global mean over ranks under ``torch.distributed`` (over the
        samples that take part when some are excluded).

        ``mask`` (bool ``[B]``) excludes samples, as in :meth:`weights`. To leave out a sample
        whose loss is NaN because of a bad input or target, mask it at the source so that no
        non-finite value enters the graph::

            ok = torch.isfinite(y)
            loss = rw((model(x) - torch.where(ok, y, 0.0)) ** 2, mask=ok)

        The gradient is then exactly that of the batch without those samples.
        """
        if self.accumulation == "global":
            if self._calls_since_step >= 1:
                raise RuntimeError(
                    "accumulation='global' needs the whole accumulation window in one call: use "
                    "rw.accumulate(micro_batches, loss_fn) for micro-batches, and call rw.step() after "
                    "each optimizer step"
                )
            self._calls_since_step += 1
        weights, keep = self._weights_and_mask(per_sample_loss, mask)
        loss = per_sample_loss.float()
        if keep is not None:
            # where() (not multiplication by 0) so that a NaN loss cannot leak into the sum, and
            # the gradient reaching per_sample_loss at a left-out sample is exactly 0.
            loss = torch.where(keep, loss, torch.zeros_like(loss))
        if self._is_uniform() and not D.is_distributed(self.group) and keep is None:
            return loss.mean()
        # The weights were made (and checked) here: no re-validation, no collective.
        return (weights.to(loss.device) * loss).sum() * D.world_size(self.group)

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
        check_window(micro_batches, per_sample_loss_fn)
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
