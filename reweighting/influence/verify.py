"""Run-time verification: the engine's per-unit gradients against autograd's, on the same forward.

For a few units ``u`` (samples, documents or micro-batches) with weights ``w_u`` over the losses
(one-hot, or the indicator of a micro-batch), autograd gives the reference gradient
``r_u = grad_K sum_i w_ui l_i`` from the captured graph. The engine's answer is compared with it
per parameter, twice:

- the squared norm ``n_u`` the rules gave: ``|n_u - ||r_u||^2| <= 2 tol max(||r_u||^2, f_u^2)``;
- the gradient the weighted update forms from the same factors, ``e_u = sum_f f.weighted(w_u)``:
  ``||e_u - r_u|| <= tol max(||r_u||, f_u)``,

with ``f_u = 1e-3 ||r_u||_K`` (a floor relative to the unit's whole gradient, for parameters whose
gradient is nearly zero) and ``tol`` by the parameters' dtype. Any rule that does not hold for the
model as it runs (a batch dimension that is not first, samples that see each other, documents of a
packed row that attend to each other, a look-alike layer) fails here rather than giving a wrong
number. It costs one backward per checked unit, so the engine runs it on the first call and
whenever the parameters, modules or input layout change.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["HINT", "DOCUMENTS_HINT", "VerificationError", "check_units", "unit_weights", "reference_grads", "compare",
           "tolerance"]


HINT = ("samples that interact (batch statistics, a loss or an operation over the batch such as x - x.mean(0)), a "
        "layer whose first dimension is not the batch (sequence-first, flattened, or a table broadcast over the batch "
        "that belongs in broadcast=[...] or reference=[...]), or a layer that a rule does not describe")
DOCUMENTS_HINT = ("the documents of a packed row see each other (attention across document boundaries: give each "
                  "document its own position ids starting at 0 and a block-diagonal mask, e.g. flash-attention "
                  "varlen or position_ids-based packing), or ")


class VerificationError(RuntimeError):
    """The engine's per-sample gradients disagree with autograd's on the same forward."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for parameters of ``dtype`` (autograd's reference is computed in that dtype)."""
    if dtype == torch.float64:
        return 1e-4  # some rules (attention) form their factors in float32
    if dtype == torch.float32:
        return 1e-3
    return 5e-2  # bfloat16 / float16: the reference itself carries ~1% rounding


def check_units(units: int, k: int) -> list[int]:
    """``k`` units spread over ``0 .. units - 1``, the first and the last included."""
    k = min(k, units)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(j * (units - 1) / (k - 1)) for j in range(k)})


def unit_weights(units: list[int], b: int, sizes: list[int] | None, device) -> list[torch.Tensor]:
    """``[b]`` float32 weights selecting each unit's losses (one sample, or one micro-batch)."""
    starts = [0]
    for s in sizes or [1] * b:
        starts.append(starts[-1] + s)
    out = []
    for u in units:
        w = torch.zeros(b, device=device)
        w[starts[u]:starts[u + 1]] = 1.0
        out.append(w)
    return out


def reference_grads(losses: torch.Tensor, params: list[nn.Parameter], weights: list[torch.Tensor]) -> list[list]:
    """For each weight vector, autograd's ``grad_K sum_i w_i l_i`` per parameter (the graph is kept)."""
    out = []
    for w in weights:
        grads = torch.autograd.grad((w.to(losses.dtype) * losses).sum(), params, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)])
    return out


def compare(params: list[nn.Parameter], names: list[str], units: list[int], reference: list[list],
            norms: dict, grads: dict, tol: float | None, hint: str) -> None:
    """Raise :class:`VerificationError` naming the first parameter (in ``params`` order) where the
    engine's norm (``norms[p]``: ``[units]``) or update gradient (``grads[p][k]`` for the ``k``-th
    checked unit) differs from autograd's ``reference[k][j]``."""
    for k, u in enumerate(units):
        ref = reference[k]
        whole = torch.sqrt(sum(r.double().square().sum() for r in ref)) if ref else torch.zeros(())
        for j, p in enumerate(params):
            t = tol if tol is not None else tolerance(p.dtype)
            r = ref[j].double().reshape(-1)
            floor = 1e-3 * float(whole)
            r_norm = float(r.norm())
            if p in norms:
                got = float(norms[p][u])
                if abs(got - r_norm ** 2) > 2 * t * max(r_norm ** 2, floor ** 2):
                    _fail(names[j], u, "squared gradient norm", got, r_norm ** 2, hint)
            if p in grads:
                e = grads[p][k].double().reshape(-1)
                err = float((e - r).norm())
                if err > t * max(r_norm, floor):
                    _fail(names[j], u, "gradient (as the weighted update forms it)", float(e.norm()), r_norm, hint,
                          rel=err / max(r_norm, floor, 1e-300))


def _fail(name: str, unit: int, what: str, got: float, want: float, hint: str, rel: float | None = None) -> None:
    rel = abs(got - want) / max(abs(want), 1e-300) if rel is None else rel
    raise VerificationError(
        f"self-influence verification failed at parameter {name!r}: for unit {unit} its {what} is {got:.6g} by the "
        f"engine's layer rules but {want:.6g} by autograd on the same forward (relative error {rel:.3g}). "
        f"The rules' assumptions do not hold for this model or batch: {hint}. Fix that cause; "
        "verify=False skips this check (the numbers would still be wrong)"
    )
