"""Learning from noisy labels with a transition matrix: RENT, DWS, reweighting, forward correction.

Layout everywhere: ``T[noisy, clean] = P(noisy label | clean label)``, columns sum to 1
(docs/methods/noisy-labels.md, Bae et al., ICLR 2024).
"""

from .learned import LearnedTransition
from .losses import (
    LOSSES,
    backward_loss,
    dws_loss,
    forward_loss,
    importance_weights,
    noisy_label_loss,
    rent_loss,
    reweight_loss,
)
from .noise import corrupt_labels, pair_noise, symmetric_noise
from .train import NoisyLabelRun, predict_probs, train_epochs, train_with_transition
from .transition import (
    COLUMN_SUM_TOLERANCE,
    ESTIMATORS,
    MAX_CONDITION,
    check_transition,
    estimate_transition,
    pair_transition,
    symmetric_transition,
    transition_error,
)

__all__ = [
    "COLUMN_SUM_TOLERANCE",
    "ESTIMATORS",
    "LOSSES",
    "MAX_CONDITION",
    "LearnedTransition",
    "NoisyLabelRun",
    "backward_loss",
    "check_transition",
    "corrupt_labels",
    "dws_loss",
    "estimate_transition",
    "forward_loss",
    "importance_weights",
    "noisy_label_loss",
    "pair_noise",
    "pair_transition",
    "predict_probs",
    "rent_loss",
    "reweight_loss",
    "symmetric_noise",
    "symmetric_transition",
    "train_epochs",
    "train_with_transition",
    "transition_error",
]
