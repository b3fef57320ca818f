"""A transition matrix learned jointly with the classifier (VolMinNet, Li et al., ICML 2021)."""

from __future__ import annotations

import torch
from torch import nn

from .losses import forward_loss

__all__ = ["LearnedTransition"]


class LearnedTransition(nn.Module):
    """``T = colnorm(I + sigmoid(W) * (1 - I))`` in the ``T[noisy, clean]`` layout (docs/methods/noisy-labels.md).

    Every column is normalised to sum to 1 (VolMinNet normalises rows of its ``[clean, noisy]``
    matrix, which is the transpose of ours). ``W`` starts at ``-init`` everywhere, so ``T`` starts
    near the identity. Train it with :meth:`loss`: the forward-corrected NLL of the observed labels
    plus ``penalty_weight * log|det T|``, the volume penalty that makes the smallest simplex
    containing the noisy posteriors the solution. State lives in ``state_dict()`` as for any module.
    """

    def __init__(self, num_classes: int, init: float = 2.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.full((num_classes, num_classes), -float(init)))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(num_classes), persistent=False)

    def forward(self) -> torch.Tensor:
        """The current ``T[noisy, clean]`` (with gradient to ``W``); columns sum to 1."""
        eye = 1.0 - self.off_diagonal
        unnormalised = eye + torch.sigmoid(self.weight) * self.off_diagonal
        return unnormalised / unnormalised.sum(0, keepdim=True)

    def penalty(self) -> torch.Tensor:
        """``log |det T|``: the log-volume of the simplex spanned by the columns of ``T``."""
        return torch.linalg.slogdet(self()).logabsdet

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, penalty_weight: float = 1e-4) -> torch.Tensor:
        """``forward_loss(f, y, T) + penalty_weight * log|det T|`` for this module's parameters.

        ``logits`` are detached here, so that only ``T`` learns from this loss; the classifier is
        trained by its own loss (RENT, DWS, ...) with :meth:`matrix`.
        """
        return forward_loss(logits.detach(), labels, self(), check=False) + penalty_weight * self.penalty()

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The current ``T`` detached, for the weighting losses."""
        return self().detach().clone()
