"""From token losses to per-sample losses, and from per-sample losses and weights to one scalar.

Gradient semantics under data parallelism: DDP (and FSDP) *average* gradients over ranks. If
weights ``w`` sum to 1 over the global batch, the gradient we want is ``sum_i w_i grad l_i`` over
all ranks' samples. Each rank therefore returns ``world_size * sum_{i on this rank} w_i l_i``: the
average over ranks of these is exactly the global weighted sum. In one process the factor is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from . import distributed as D
from .checks import check_batch, check_same_length, check_weight_values, checks_enabled, describe_indices

__all__ = ["SEQUENCE_EMPTY", "sequence_loss", "weighted_loss", "score_window", "restore_rng_state",
           "accumulate_weighted"]


SEQUENCE_EMPTY = ("raise", "nan")


def sequence_loss(token_loss: torch.Tensor, mask: torch.Tensor | None = None, *, empty: str = "raise") -> torch.Tensor:
    """Per-sequence mean over unmasked tokens: ``l_i = sum_t m_it l_it / sum_t m_it`` (shape ``[B]``).

    ``token_loss`` is ``[B, T]`` float (e.g. ``cross_entropy(..., reduction="none")`` reshaped);
    ``mask`` is ``[B, T]`` bool, or 0/1 integers or floats, with 1 / True for real tokens
    (``None``: every token counts). Computed in float32; keeps the graph. A NaN in a masked-out
    position does not leak into the mean or its gradient.

    A sequence with no real token (common after truncation in SFT) has no mean, and never gets a
    made-up loss of 0 (which would enter the min-max range and change every other weight):

    - ``empty="raise"`` (default): ``ValueError`` naming the sequences. With checks off
      (``set_checks(False)``, no host sync) such rows come out NaN instead, so a later step
      fails loudly rather than training on a fake value.
    - ``empty="nan"``: such rows are NaN, without error. Their gradient is exactly 0 and the other
      rows' are untouched. Exclude them from the weights with
      ``LossReweighter.weights(losses, mask=token_mask.any(dim=1))`` (or ``rw(losses, mask=...)``):
      they get weight 0, enter no statistic, and are counted in ``stats.n_masked``.
    """
    if not isinstance(token_loss, torch.Tensor):
        raise TypeError(f"token_loss must be a torch.Tensor, got {type(token_loss).__name__}")
    if not token_loss.is_floating_point():
        raise TypeError(f"token_loss must be a floating-point tensor (losses), got dtype {token_loss.dtype}")
    if empty not in SEQUENCE_EMPTY:
        raise ValueError(f"empty must be one of {SEQUENCE_EMPTY}, got {empty!r}")
    if token_loss.dim() != 2:
        raise ValueError(f"token_loss must be [batch, tokens], got shape {tuple(token_loss.shape)}")
    if token_loss.shape[0] == 0:
        raise ValueError("token_loss is empty: a batch needs at least one sequence")
    if token_loss.shape[1] == 0:
        raise ValueError(f"token_loss has no tokens (shape {tuple(token_loss.shape)}): every sequence needs one")
    loss = token_loss.float()
    if mask is None:
        return loss.mean(dim=1)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [batch, tokens], got {type(mask).__name__}")
    if mask.shape != token_loss.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match token_loss shape {tuple(token_loss.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
    mask = mask.to(device=loss.device)
    real = mask if mask.dtype == torch.bool else mask != 0
    counts = real.sum(dim=1)
    has_tokens = counts > 0
    if checks_enabled():
        # One host read for both checks.
        not_binary = (mask != 0) & (mask != 1) if mask.dtype != torch.bool else torch.zeros_like(real)
        flags = torch.stack([not_binary.any(), (~has_tokens).any()]).tolist()
        if flags[0]:
            rows = not_binary.any(dim=1)
            raise ValueError(f"mask must hold only 0 and 1 (or booleans), but sequences {describe_indices(rows)} "
                             "have other values; a soft mask is not a token mask")
        if flags[1] and empty == "raise":
            raise ValueError(
                f"mask has no real token in sequences {describe_indices(~has_tokens)}: their mean loss is "
                "undefined (pass empty='nan' and exclude them with LossReweighter(...).weights(losses, "
                "mask=...) to give them weight 0)"
            )
    # where() rather than multiplication so that a NaN in a padded position cannot leak in.
    total = torch.where(real, loss, torch.zeros_like(loss)).sum(dim=1)
    mean = total / counts.clamp(min=1).to(loss.dtype)
    return torch.where(has_tokens, mean, torch.full_like(mean, math.nan))


def weighted_loss(per_sample_loss: torch.Tensor, weights: torch.Tensor, *, group=None) -> torch.Tensor:
    """Scalar whose gradient, after DDP's averaging over ranks, is ``sum_i w_i grad l_i`` over the global batch.

    ``weights`` are this rank's slice of weights normalised over the global batch (as returned by
    :func:`reweighting.tilt` and the reweighters); they are detached here. Returns
    ``world_size * sum_{i on this rank} w_i l_i`` in float32. In one process this is ``sum_i w_i l_i``,
    and with uniform weights ``1 / B`` it equals the plain mean.

    A sample with weight exactly 0 is left out (``torch.where``, not ``0 * l``): a NaN or
    infinite loss there does not turn the sum into NaN, and the gradient reaching its loss is 0.
    Weights must be finite and >= 0 (``ValueError`` naming the sample indices, one host read;
    skipped under ``set_checks(False)``); in one process at least one must be positive.

    Gradient accumulation: if the weights were normalised over the whole window (all micro-batches,
    see :func:`accumulate_weighted`) call ``backward`` on each micro-batch's value as is and do not
    divide by the number of micro-batches. If they were normalised per micro-batch (the paper's
    behaviour), divide by the number of micro-batches as for a plain mean.
    """
    for value, name in ((per_sample_loss, "per_sample_loss"), (weights, "weights")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-d (one value per sample), got shape {tuple(value.shape)}")
    if not D.is_distributed(group):
        check_batch(per_sample_loss, "per_sample_loss")
    check_same_length(per_sample_loss, "per_sample_loss", weights, "weights")
    w = weights.detach().to(device=per_sample_loss.device, dtype=torch.float32)
    if checks_enabled():
        check_weight_values(w, "weights", require_positive=not D.is_distributed(group))
    loss = per_sample_loss.float()
    loss = torch.where(w > 0, loss, torch.zeros_like(loss))
    return (w * loss).sum() * D.world_size(group)


RngState = tuple[torch.Tensor, list[torch.Tensor] | None]


def _rng_state() -> RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng_state(state: RngState) -> None:
    """Put the CPU (and CUDA) random state back to one saved by :func:`score_window`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def score_window(
    micro_batches: Sequence[Any], per_sample_loss_fn: Callable[[Any], torch.Tensor]
) -> tuple[list[torch.Tensor], list[RngState]]:
    """Per-sample losses of every micro-batch under ``torch.no_grad``, and the RNG state before each.

    Step 1 of :func:`accumulate_weighted`, for loops that run the training passes themselves (a
    Trainer): restoring ``states[k]`` with :func:`restore_rng_state` before micro-batch ``k``'s
    training forward replays its dropout masks, so the losses there equal the scored ones.
    Returns detached float32 losses, one tensor per micro-batch.
    """
    check_window(micro_batches, per_sample_loss_fn)
    states, losses = [], []
    with torch.no_grad():
        for k, mb in enumerate(micro_batches):
            states.append(_rng_state())
            losses.append(_window_losses(per_sample_loss_fn(mb), k).detach().float())
    return losses, states


def check_window(micro_batches: Sequence[Any], per_sample_loss_fn: Callable[[Any], torch.Tensor]) -> None:
    """A window is a non-empty sequence (it is traversed twice) and the loss function a callable."""
    if not isinstance(micro_batches, Sequence) or isinstance(micro_batches, (str, bytes)):
        raise TypeError(
            f"micro_batches must be a list or tuple of micro-batches (the window is traversed twice), got "
            f"{type(micro_batches).__name__}"
        )
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty: a window needs at least one micro-batch")
    if not callable(per_sample_loss_fn):
        raise TypeError(f"per_sample_loss_fn must be callable (micro-batch -> per-sample losses [B]), got "
                        f"{type(per_sample_loss_fn).__name__}")


def _window_losses(out: Any, k: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or not out.is_floating_point():
        got = (f"shape {tuple(out.shape)} dtype {out.dtype}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise TypeError(f"per_sample_loss_fn must return a 1-d float tensor of per-sample losses, got {got} "
                        f"for micro-batch {k}")
    return out


def accumulate_weighted(
    micro_batches: Sequence[Any],
    per_sample_loss_fn: Callable[[Any], torch.Tensor],
    weight_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    no_sync: Callable[[], Any] | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward pass of a gradient-accumulation window with weights normalised over the **whole** window.

    1. Score (:func:`score_window`): ``per_sample_loss_fn(mb)`` for every micro-batch under
       ``torch.no_grad`` (the RNG state before each is saved, so dropout masks are replayed
       identically in step 3).
    2. Weigh: ``weights = weight_fn(cat(losses))``; ``weight_fn`` normalises over ranks itself
       (every function of the weight core does), so the weights are global over ranks *and* window.
    3. Train: for each micro-batch, replay the RNG state, recompute the losses with a graph and
       call ``weighted_loss(...).backward()``. Pass ``no_sync=model.no_sync`` under DDP so gradients
       are all-reduced only on the last micro-batch.

    The accumulated gradient equals that of one step on the concatenated window. Cost: one extra
    forward pass per micro-batch without stored activations (about a third of a training step's
    compute), and no extra memory beyond one micro-batch's activations.

    Returns ``(weights, losses)`` for the window (detached, this rank's samples in order).
    """
    check_window(micro_batches, per_sample_loss_fn)
    if not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable (losses -> weights), got {type(weight_fn).__name__}")
    losses, states = score_window(micro_batches, per_sample_loss_fn)
    all_losses = torch.cat(losses)
    weights = weight_fn(all_losses)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weight_fn must return a tensor of weights, got {type(weights).__name__}")
    check_same_length(all_losses, "window losses", weights, "weight_fn output")
    pieces = weights.split([loss.shape[0] for loss in losses])
    last = len(micro_batches) - 1
    for k, (mb, state, w) in enumerate(zip(micro_batches, states, pieces)):
        restore_rng_state(state)
        context = no_sync() if (no_sync is not None and k < last) else nullcontext()
        with context:
            weighted_loss(_window_losses(per_sample_loss_fn(mb), k), w, group=group).backward()
    return weights.detach(), all_losses
