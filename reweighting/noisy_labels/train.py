"""Warm up with cross-entropy, estimate ``T``, continue with a transition-aware loss: a loop without a Trainer.

For a user's model, optimizer and loader of ``(inputs, noisy_labels)`` batches. The pieces
(:func:`train_epochs`, :func:`predict_probs`) are public so that experiments can share one
warm-up between several losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .learned import LearnedTransition
from .losses import LOSSES, noisy_label_loss
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
    return next(model.parameters()).device


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
) -> list[dict[str, Any]]:
    """``epochs`` passes over ``loader`` minimising ``loss`` (one of :data:`LOSSES`) with ``transition``.

    A :class:`LearnedTransition` is trained alongside, on each batch, by ``transition_optimizer``
    with its own loss (forward NLL on detached logits plus the volume penalty), as in VolMinNet;
    the classifier's loss uses its current matrix. ``evaluate(model)`` runs after every epoch (in
    eval mode) and its numbers join that epoch's history row.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    learned = transition if isinstance(transition, LearnedTransition) else None
    if learned is not None and transition_optimizer is None:
        raise ValueError("a LearnedTransition needs a transition_optimizer")
    device = _device(model)
    history = []
    bar = _progress(range(epochs), f"{phase} ({loss})", show_progress)
    for epoch in bar:
        model.train()
        total, batches = torch.zeros((), device=device), 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
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
        row: dict[str, Any] = {"phase": phase, "epoch": epoch, "loss": float(total) / max(batches, 1)}
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                row.update(evaluate(model))
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    return history


@torch.no_grad()
def predict_probs(model: nn.Module, loader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's softmax posteriors (its estimate of ``p(noisy | x)``) and the labels, over one pass."""
    model.eval()
    device = _device(model)
    probs, labels = [], []
    for inputs, y in loader:
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
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    history = train_epochs(model, loader, optimizer, warmup_epochs, loss="ce", evaluate=evaluate,
                           phase="warm-up", show_progress=show_progress)
    learned, transition_optimizer = None, None
    if loss == "ce":
        T = None
    elif isinstance(transition, torch.Tensor):
        T = check_transition(transition).to(_device(model))
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
