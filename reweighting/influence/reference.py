"""Reference per-sample gradients: ``torch.func.vmap(grad(...))``, a per-sample loop, and autograd.

These materialise every per-sample gradient, so they cost memory ``B x (number of parameters)``;
they are what the fast engine (:class:`reweighting.influence.SelfInfluence`) is tested against,
and the engine's fallback for layers it has no rule for.

``loss_fn(model, *inputs) -> [B]`` computes per-sample losses of a batch whose tensors all have
the batch dimension first; for the vmapped reference it is called on batches of one sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

__all__ = ["per_sample_grads", "per_sample_grads_loop", "per_sample_sq_norms", "batched_autograd_grads"]

LossFn = Callable[..., torch.Tensor]


class _Objective(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, *inputs)


def _selected(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())  # tied parameters appear once, under their first name
    if params is None:
        return {n: p for n, p in named.items() if p.requires_grad}
    chosen = list(params)
    unknown = [n for n in chosen if n not in named]
    if unknown:
        raise ValueError(f"params names {unknown} are not (first) parameter names of the model")
    return {n: named[n] for n in chosen}


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, *inputs: torch.Tensor, params: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: the gradient of each sample's own loss, by ``vmap(grad(...))``.

    A tied parameter is one entry whose gradient sums all its uses.
    """
    objective = _Objective(model, loss_fn)
    wanted = _selected(model, params)
    fixed = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n not in wanted}
    buffers = {f"model.{n}": b for n, b in model.named_buffers()}

    def one_loss(trainable: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        state = {**fixed, **{f"model.{n}": p for n, p in trainable.items()}, **buffers}
        batch = tuple(s.unsqueeze(0) for s in sample)
        return torch.func.functional_call(objective, state, batch)[0]

    values = {n: p.detach() for n, p in wanted.items()}
    in_dims = (None, *([0] * len(inputs)))
    return torch.func.vmap(torch.func.grad(one_loss), in_dims=in_dims)(values, *inputs)


def per_sample_grads_loop(
    model: nn.Module, loss_fn: LossFn, *inputs: torch.Tensor, params: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Same as :func:`per_sample_grads`, one forward and backward per sample (the slowest baseline)."""
    wanted = _selected(model, params)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    for i in range(inputs[0].shape[0]):
        loss = loss_fn(model, *(x[i : i + 1] for x in inputs))[0]
        grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
        for (n, p), g in zip(wanted.items(), grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(gs) for n, gs in out.items()}


def per_sample_sq_norms(
    model: nn.Module, loss_fn: LossFn, *inputs: torch.Tensor, params: Iterable[str] | None = None
) -> torch.Tensor:
    """``[B]``: ``||grad l_i||^2`` over the chosen parameters, from :func:`per_sample_grads`."""
    grads = per_sample_grads(model, loss_fn, *inputs, params=params)
    return sum(g.reshape(g.shape[0], -1).float().square().sum(1) for g in grads.values())  # scalars too


def batched_autograd_grads(losses: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[B, *shape]`` per parameter: the gradient of each ``losses[i]`` from an existing graph.

    Uses autograd's batched backward (vmap over the output gradients, one pass for the whole
    batch) and falls back to one backward per sample where an operation has no batching rule.
    This works for any layer, so it is the engine's fallback for layers without a rule. The
    graph is kept (the engine's own backward follows).
    """
    b = losses.shape[0]
    eye = torch.eye(b, device=losses.device, dtype=losses.dtype)
    try:
        grads = torch.autograd.grad(losses, list(params), grad_outputs=eye, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(losses[i], list(params), retain_graph=True, allow_unused=True) for i in range(b)]
        grads = tuple(
            torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
            for k, p in enumerate(params)
        )
    return [g if g is not None else torch.zeros(b, *p.shape, device=p.device, dtype=p.dtype)
            for g, p in zip(grads, params)]
