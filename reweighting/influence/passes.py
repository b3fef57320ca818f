"""One :meth:`SelfInfluence.norms` pass: from the captured calls and their output gradients to
per-parameter factors and per-unit squared norms.

Each captured call (:class:`Call`) becomes factors by its layer's rule as soon as its output
gradient arrives; once a parameter's last use is in, its squared norms are formed from all its
uses' factors (the ghost form, or the materialised per-unit gradient, kept within a memory
allowance for the weighted update) and added to the pass's total (:class:`Pass`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .documents import by_document
from .factors import Factor, OuterFactor, sq_norms, tied_sq_norms
from .layers import call_rule_for, rule_for
from .layers.embedding import embedding as _embedding_rule
from .layers.hf_conv1d import hf_conv1d as _hf_conv1d_rule
from .layers.layernorm import layer_norm as _layer_norm_rule
from .layers.linear import linear as _linear_rule
from .layers.rmsnorm_like import rms_norm_like as _rms_norm_like_rule

__all__ = ["Call", "Pass", "apply_rule", "consume", "finish", "positionwise", "symbols", "batch_hint"]

# Rules whose per-sample gradient is a sum over positions of per-position terms.
_POSITIONWISE = {_linear_rule, _embedding_rule, _hf_conv1d_rule, _layer_norm_rule, _rms_norm_like_rule}
if hasattr(nn, "RMSNorm"):
    from .layers.layernorm import rms_norm as _rms_norm_rule

    _POSITIONWISE.add(_rms_norm_rule)


@dataclass
class Call:
    name: str
    module: nn.Module | types.SimpleNamespace
    params: dict[str, nn.Parameter]  # rule's parameter names -> the engine's (canonical) parameters
    # Where each output's gradient enters the graph (None: no gradient), not the outputs themselves:
    # holding the outputs would keep every layer's output alive through the backward, and an edge
    # still gives the right gradient when the output is later modified in place (ReLU(inplace=True)).
    edges: list
    like: list  # (shape, dtype, device) of each output, for a zero gradient where none arrives
    stops: set = field(default_factory=set)  # grad_fn nodes of the call's inputs: where its own graph ends
    activation: torch.Tensor | None = None  # the first input (module and functional rules)
    version: int = 0  # the first input's version counter when captured
    inputs: tuple = ()  # every argument, detached (call rules)
    kwargs: dict = field(default_factory=dict)
    call_rule: bool = False
    hook: object = None  # the handle of the gradient hook on the output
    direct: bool = False  # its output gradient is returned by the backward, not consumed by the hook
    consumed: bool = False
    layout: tuple = ()  # the input's shape in symbols (see _symbols) and dtype: what verification keys on


@dataclass
class Pass:
    """The state of one :meth:`SelfInfluence.norms` call while output gradients arrive."""

    b: int
    sizes: list[int] | None
    total: torch.Tensor
    room: int
    norm_params: set
    dtype: torch.dtype
    documents: torch.Tensor | None = None  # [rows, positions] document ids of packed rows
    slots: torch.Tensor | None = None  # each position's flat index in [documents + 1, positions]
    remaining: dict = field(default_factory=dict)  # parameter -> uses whose gradient has not arrived
    factors: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    per_param: dict | None = None  # parameter -> its norms, while verifying


def positionwise(c: Call) -> bool:
    """Rules whose per-sample gradient is a sum of per-position terms (so positions can be regrouped)."""
    if isinstance(c.module, types.SimpleNamespace):
        return True
    return rule_for(c.module) in _POSITIONWISE


def symbols(shape, b: int | None) -> tuple:
    """A shape up to its sizes: which dims equal the batch size or 1 (a dim that starts or stops
    matching the batch size changes the layout, and so triggers a new verification)."""
    return tuple("B" if d == b else "1" if d == 1 else "*" for d in shape)


def batch_hint(shape: tuple, b: int) -> str:
    """Why a layer's input does not start with the batch of ``b`` samples, as far as its shape tells."""
    hints = []
    if shape and shape[0] > b and shape[0] % b == 0:
        hints.append(f"its input looks flattened ({shape[0]} rows = {b} samples x {shape[0] // b}): keep the batch "
                     "dimension through the layer ([B, T, ...] rather than [B*T, ...])")
    if len(shape) >= 2 and shape[1] == b:
        hints.append("its input holds the batch in dim 1 (a sequence-first layout, e.g. batch_first=False): run the "
                     "layer batch-first ([B, T, ...])")
    if shape and shape[0] < b and len(shape) >= 2:
        hints.append("if each row holds several documents (packed rows), pass documents=[rows, positions] ids")
    hints.append("if the layer runs once for the whole batch and is broadcast over it (a position table), put it in "
                 "broadcast=[...], or in reference=[...] to take its per-sample gradients from autograd")
    return "; or ".join(hints)


def apply_rule(c: Call, gs: list, state: Pass) -> dict[str, Factor]:
    b = state.b
    if state.documents is not None and (c.call_rule or not positionwise(c)):
        raise ValueError(
            f"module {c.name!r} ({type(c.module).__name__}) mixes positions (convolution, attention), so its "
            "per-document gradients cannot be split out of a packed row: leave it out (modules=[...], "
            "bookkeeping=False) or score one document per row"
        )
    if c.call_rule:
        gs = [g.detach() if g is not None else None for g in gs]
        if gs[0] is None:
            shape, dtype, device = c.like[0]
            gs[0] = torch.zeros(shape, dtype=dtype, device=device)
        produced = call_rule_for(c.module)(c.module, c.inputs, c.kwargs, tuple(gs))
    else:
        g, x = gs[0].detach(), c.activation
        if state.documents is not None:
            rows = tuple(state.documents.shape)
            if tuple(x.shape[:2]) != rows or tuple(g.shape[:2]) != rows:
                raise ValueError(
                    f"module {c.name!r} saw inputs of shape {tuple(x.shape)} but documents has shape {rows}: "
                    "every tracked layer must see [rows, positions, ...] with the documents' positions"
                )
            x, g = (by_document(t, state.slots, b, rows[1]) for t in (x, g))
        elif x.shape[0] != b or g.shape[0] != b:
            raise ValueError(
                f"module {c.name!r} ({type(c.module).__name__}) saw an input of shape {tuple(x.shape)} but "
                f"losses has {b} samples, and the batch dimension must come first in every layer's input: "
                + batch_hint(tuple(x.shape), b)
            )
        rule = _linear_rule if isinstance(c.module, types.SimpleNamespace) else rule_for(c.module)
        produced = rule(c.module, x if not x.is_floating_point() else x.to(state.dtype), g.to(state.dtype))
    for f in produced.values():
        if f.units != b:
            raise ValueError(f"module {c.name!r} saw a batch of {f.units} but losses has {b} samples")
    return produced

def consume(state: Pass, c: Call, gs: list) -> None:
    c.consumed = True
    produced: dict[str, Factor] = {}
    if any(g is not None for g in gs):
        produced = apply_rule(c, gs, state)
    c.activation, c.inputs = None, ()  # the factors hold what the update needs; the rest may go
    for pname, q in c.params.items():
        f = produced.get(pname)
        if f is not None:
            state.factors.setdefault(q, []).append(f)
        state.remaining[q] -= 1
        if state.remaining[q] == 0:
            finish_param(state, q)

def finish_param(state: Pass, q: nn.Parameter) -> None:
    if q not in state.norm_params or q not in state.factors:
        return
    norms = finish(q, state.factors, state.sizes, state.kept, state.room)
    state.total += norms
    if state.per_param is not None:
        state.per_param[q] = norms
    if q in state.kept:
        state.room -= state.kept[q].numel() * state.kept[q].element_size()
        del state.factors[q]  # the kept per-sample gradient serves the update

def finish(p: nn.Parameter, factors: dict, sizes: list[int] | None, kept: dict, room: int) -> torch.Tensor:
    """``[units]``: the squared norms of ``p``'s per-unit gradient, from all its uses' factors."""
    fs = factors[p]
    if sizes:
        fs = [f.grouped(sizes) for f in fs]
    if len(fs) == 1 and not (isinstance(fs[0], OuterFactor) and not fs[0].ghost_is_cheaper()):
        return fs[0].sq_norms()
    tied = tied_sq_norms(fs)
    if tied is not None:
        return tied
    # Materialised (cheaper than the ghost form, or a shared parameter whose uses must be summed
    # before the norm). Per-sample gradients are kept, within the memory allowance, because the
    # weighted update is then a cheap weighted sum of them rather than a product over positions.
    per_unit = fs[0].per_unit()
    for f in fs[1:]:
        per_unit = per_unit + f.per_unit()
    if not sizes and per_unit.numel() * per_unit.element_size() <= room:
        kept[p] = per_unit
    return sq_norms(per_unit)
