"""Warm up with cross-entropy, estimate ``T``, continue with a transition-aware loss: a loop without a Trainer.

For a user's model, optimizer and loader of ``(inputs, noisy_labels)`` batches. The pieces
(:func:`train_epochs`, :func:`predict_probs`) are public so that experiments can share one
warm-up between several losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import check_choice, check_count
from .learned import LearnedTransition
from .losses import _OPTIONS, LOSSES, noisy_label_loss
from .transition import ESTIMATORS, check_transition, estimate_transition

__all__ = ["NoisyLabelRun", "train_epochs", "predict_probs", "train_with_transition"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class NoisyLabelRun:
    """What :func:`train_with_transition` returns: the ``T`` used last, per-epoch history, the learned module."""

    transition: torch.Tensor | None
    history: list[dict[str, Any]] = field(default_factory=list)
    learned: LearnedTransition | None = None


def _device(model: nn.Module) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters to train") from None


def _check_loader(loader: Batches) -> None:
    """``loader`` must be iterable again for every epoch (a DataLoader or a list, not a generator)."""
    if isinstance(loader, Mapping) or not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of (inputs, labels) batches, got {type(loader).__name__}")
    if iter(loader) is loader:
        raise TypeError(
            f"loader is a one-shot iterator ({type(loader).__name__}): it would be exhausted after the first "
            "epoch and later epochs would silently train on nothing; pass a DataLoader or a list of batches"
        )


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, labels)`` batch, or a clear error naming what the loader gave instead."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"loader gave a dict batch (keys {sorted(map(str, batch))}); batches must be (inputs, labels) pairs: "
            "wrap it, e.g. [(b['x'], b['y']) for b in loader]"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else \
            f"a {type(batch).__name__}"
        raise TypeError(f"loader batches must be (inputs, labels) pairs, got {kind}")
    inputs, labels = batch
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"the labels of a loader batch must be a torch.Tensor, got {type(labels).__name__}")
    return inputs, labels


def _check_outputs(logits: Any, labels: torch.Tensor, num_classes: int | None) -> None:
    """The model's output must be ``[batch, classes]`` logits with as many classes as ``T``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits [batch, classes], got {shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model returns {logits.shape[1]} classes per sample but the transition matrix is "
                         f"{num_classes}x{num_classes}")


def _progress(iterable, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def train_epochs(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    loss: str = "ce",
    transition: torch.Tensor | LearnedTransition | None = None,
    transition_optimizer: torch.optim.Optimizer | None = None,
    penalty_weight: float = 1e-4,
    loss_options: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    phase: str = "train",
    show_progress: bool = True,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """``epochs`` passes over ``loader`` minimising ``loss`` (one of :data:`LOSSES`) with ``transition``.

    A :class:`LearnedTransition` is trained alongside, on each batch, by ``transition_optimizer``
    with its own loss (forward NLL on detached logits plus the volume penalty), as in VolMinNet;
    the classifier's loss uses its current matrix. ``evaluate(model)`` runs after every epoch (in
    eval mode) and its numbers join that epoch's history row.

    Every batch must be an ``(inputs, labels)`` pair and ``loader`` re-iterable (not a generator).
    The model's number of outputs is checked on every batch against ``num_classes`` (default: the
    size of ``transition``), before any optimizer step.
    """
    check_choice(loss, "loss", LOSSES)
    epochs = check_count(epochs, "epochs")
    _check_loader(loader)
    _check_loss_options(loss, loss_options)
    learned = transition if isinstance(transition, LearnedTransition) else None
    if learned is not None and transition_optimizer is None:
        raise ValueError("a LearnedTransition needs a transition_optimizer")
    if transition is not None and not isinstance(transition, (torch.Tensor, LearnedTransition)):
        raise TypeError(f"transition must be a tensor, a LearnedTransition or None, got {type(transition).__name__}")
    if transition is not None:
        num_classes = learned.num_classes if learned is not None else int(transition.shape[0])
    device = _device(model)
    history = []
    bar = _progress(range(epochs), f"{phase} ({loss})", show_progress)
    for epoch in bar:
        model.train()
        total, batches = torch.zeros((), device=device), 0
        for batch in loader:
            inputs, labels = _unpack(batch)
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            _check_outputs(logits, labels, num_classes)
            T = learned.matrix() if learned is not None else transition
            value = noisy_label_loss(loss, logits, labels, T, generator=generator, **(loss_options or {}))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if learned is not None:
                transition_optimizer.zero_grad(set_to_none=True)
                learned.loss(logits, labels, penalty_weight).backward()
                transition_optimizer.step()
            total += value.detach()
            batches += 1
        if batches == 0:
            raise ValueError(f"loader gave no batches in epoch {epoch} of {phase}")
        row: dict[str, Any] = {"phase": phase, "epoch": epoch, "loss": float(total) / max(batches, 1)}
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                row.update(evaluate(model))
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    return history


def _check_loss_options(loss: str, options: dict[str, Any] | None) -> None:
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"loss_options must be a dict of keyword options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_OPTIONS[loss]))
    if unknown:
        raise TypeError(f"loss_options {unknown} are not options of loss {loss!r}; its options are "
                        f"{list(_OPTIONS[loss])}")


@torch.no_grad()
def predict_probs(model: nn.Module, loader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's softmax posteriors (its estimate of ``p(noisy | x)``) and the labels, over one pass."""
    model.eval()
    device = _device(model)
    _check_loader(loader)
    probs, labels = [], []
    for batch in loader:
        inputs, y = _unpack(batch)
        probs.append(torch.softmax(model(inputs.to(device)).float(), dim=1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def train_with_transition(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    loss: str = "rent",
    transition: str | torch.Tensor = "anchor",
    warmup_epochs: int = 10,
    epochs: int = 40,
    quantile: float = 0.97,
    transition_lr: float = 1e-2,
    penalty_weight: float = 1e-4,
    loss_options: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    show_progress: bool = True,
) -> NoisyLabelRun:
    """Warm up with cross-entropy, obtain ``T``, then train ``epochs`` more with ``loss``.

    ``transition`` is a given matrix (checked, ``T[noisy, clean]``), an estimator name (``"anchor"``
    or ``"dualt"``, fitted on the warmed-up model's posteriors over ``loader``, see
    :func:`estimate_transition`), or ``"learned"`` (a :class:`LearnedTransition` trained jointly
    with Adam at ``transition_lr``). ``loader`` must be iterable more than once (one pass per epoch).
    """
    if not isinstance(transition, torch.Tensor) and transition != "learned" and transition not in ESTIMATORS:
        raise ValueError(f"transition must be a matrix, 'learned' or one of {ESTIMATORS}, got {transition!r}")
    check_choice(loss, "loss", LOSSES)
    check_count(warmup_epochs, "warmup_epochs")
    check_count(epochs, "epochs")
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    _check_loader(loader)
    _check_loss_options(loss, loss_options)
    # Everything that can be checked before training is: a given T's layout now, and its size
    # against the model's outputs on the first warm-up batch (not after the warm-up epochs).
    given = check_transition(transition) if isinstance(transition, torch.Tensor) and loss != "ce" else None
    history = train_epochs(model, loader, optimizer, warmup_epochs, loss="ce", evaluate=evaluate,
                           phase="warm-up", show_progress=show_progress,
                           num_classes=None if given is None else given.shape[0])
    learned, transition_optimizer = None, None
    if loss == "ce":
        T = None
    elif isinstance(transition, torch.Tensor):
        T = given.to(_device(model))
    elif transition == "learned":
        probs, _ = predict_probs(model, loader)  # only to learn the number of classes
        learned = LearnedTransition(probs.shape[1]).to(_device(model))
        transition_optimizer = torch.optim.Adam(learned.parameters(), lr=transition_lr)
        T = learned
    else:
        probs, labels = predict_probs(model, loader)
        T = estimate_transition(probs, labels, transition, quantile).to(_device(model))
    history += train_epochs(model, loader, optimizer, epochs, loss=loss, transition=T,
                            transition_optimizer=transition_optimizer, penalty_weight=penalty_weight,
                            loss_options=loss_options, generator=generator, evaluate=evaluate,
                            show_progress=show_progress)
    final = learned.matrix() if learned is not None else T
    return NoisyLabelRun(transition=final, history=history, learned=learned)
