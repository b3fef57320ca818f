"""Per-sequence and per-token causal LM losses from logits, computed as Hugging Face's causal LM loss
computes them (the shift, ``-100`` labels left out, float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reduce import sequence_loss


def causal_lm_sequence_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100,
    empty: str = "raise",
) -> torch.Tensor:
    """Per-sequence mean cross-entropy ``[B]`` from ``logits [B, T, V]`` and ``labels [B, T]`` (float32, with graph).

    As Hugging Face's causal LM loss: with ``shift`` position ``t`` predicts ``labels[:, t + 1]``;
    tokens labelled ``ignore_index`` do not count. Then ``l_i = sum_t m_it CE_it / sum_t m_it``
    (:func:`reweighting.sequence_loss`). Logits are upcast to float32 (as HF does under mixed
    precision). A sequence with no labelled token raises, naming it (``empty="raise"``), or is
    NaN (``empty="nan"``, see :func:`reweighting.sequence_loss`).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    return sequence_loss(token_loss, labels != ignore_index, empty=empty)


def _input_aligned_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """``labels`` shifted left by one with ``ignore_index`` at the end (position ``t`` predicts ``t + 1``)."""
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def causal_lm_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token losses ``[B, T]`` aligned with the inputs and the mask of tokens that carry loss.

    With ``shift`` position ``t`` holds the cross-entropy of predicting ``labels[:, t + 1]`` and the
    last position carries none (Hugging Face's shift), so document boundaries given for the inputs
    (``position_ids``, ``document_ids``, ``cu_seq_lens``) apply to the losses as they are. float32,
    with graph; positions without loss hold 0.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    targets = _input_aligned_targets(labels.to(logits.device), shift, ignore_index)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    return token_loss, targets != ignore_index
