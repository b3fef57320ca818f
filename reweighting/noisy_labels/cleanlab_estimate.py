"""Transition matrix estimated by cleanlab's confident learning, in this package's layout.

cleanlab (Northcutt et al., "Confident Learning", JAIR 2021) counts the *confident joint* of given
and latent true labels from out-of-sample posteriors, calibrates it to the label counts and
normalises it into ``noise_matrix[given, true] = P(given label | true label)``. That is this
package's ``T[noisy, clean]`` (columns sum to 1), so the estimate needs no transposition; it is
re-normalised in float64 and validated by :func:`~reweighting.noisy_labels.check_transition`.

cleanlab is an optional dependency (the ``peers`` and ``studies`` extras): without it
:func:`cleanlab_transition` raises an ImportError that says how to install it.
"""

from __future__ import annotations

import importlib.util

import torch

from .transition import check_transition

__all__ = ["cleanlab_available", "cleanlab_transition"]


def cleanlab_available() -> bool:
    """Whether cleanlab can be imported here (without importing it)."""
    return importlib.util.find_spec("cleanlab") is not None


def cleanlab_transition(probs: torch.Tensor, noisy_labels: torch.Tensor) -> torch.Tensor:
    """``T[noisy, clean]`` from cleanlab's noise-matrix estimate on posteriors ``probs`` ``[N, C]``.

    ``probs`` are a warmed-up model's predicted probabilities of the noisy labels (each row sums
    to 1), ``noisy_labels`` the observed labels ``[N]`` in ``0..C-1``; every class must occur among
    them (cleanlab counts per given label). Returns a float32 ``[C, C]`` matrix whose columns sum to 1.
    """
    if not cleanlab_available():
        raise ImportError("cleanlab_transition needs the cleanlab package, which is not installed: "
                          "pip install 'cleanlab>=2.6' (or the package's 'studies' / 'peers' extra)")
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"cleanlab_transition: probs must be a [samples, classes] tensor, "
                         f"got {getattr(probs, 'shape', type(probs).__name__)}")
    if not isinstance(noisy_labels, torch.Tensor) or noisy_labels.shape != probs.shape[:1]:
        raise ValueError(f"cleanlab_transition: noisy_labels must be a tensor of shape [{probs.shape[0]}] "
                         f"(one label per row of probs), got {getattr(noisy_labels, 'shape', type(noisy_labels))}")
    if noisy_labels.dtype.is_floating_point or noisy_labels.dtype == torch.bool:
        raise ValueError(f"cleanlab_transition: noisy_labels must be integer class indices, got {noisy_labels.dtype}")
    p = probs.detach().double().cpu()
    num_classes = p.shape[1]
    bad = ~torch.isfinite(p).all(1) | (p < 0).any(1) | ((p.sum(1) - 1).abs() > 1e-3)
    if bool(bad.any()):
        raise ValueError(f"cleanlab_transition: probs rows must be probability vectors (finite, >= 0, summing "
                         f"to 1); row {int(bad.nonzero()[0])} is not")
    labels = noisy_labels.detach().long().cpu()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"cleanlab_transition: noisy_labels must lie in 0..{num_classes - 1}, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    missing = sorted(set(range(num_classes)) - set(labels.unique().tolist()))
    if missing:
        raise ValueError(f"cleanlab_transition: classes {missing} never occur among noisy_labels; cleanlab "
                         f"estimates each column from the samples given that label")
    _, noise_matrix, _, _ = estimate_py_and_noise_matrices_from_probabilities(labels.numpy(), p.numpy())
    T = torch.as_tensor(noise_matrix, dtype=torch.float64)  # [given, true]: already our [noisy, clean]
    T = T / T.sum(0, keepdim=True)
    return check_transition(T.float(), num_classes, name="estimated T (cleanlab)")
