"""Modules that scale and shift their input by parameters applied by broadcasting: ``y = x * s + b``.

LayerScale (``y = gamma * x``), a free bias or a learned position table (``y = x + b``), a learned
scalar or per-channel scale (``y = s * x``) and the affine layer of ResMLP (``y = alpha * x + beta``)
have no registered type, so they are recognised by what they compute. A module qualifies when
all its parameters are its own (no children with parameters), trainable, one or two of them, and
its forward ``f(x)`` equals one of

    x * p,   x + p,   x * p + q,   x * q + p

for its parameters ``p, q``. That is checked by calling the forward with *random* parameter
values on a random input in float64 (:func:`classify`), so a formula that holds only for the
current values (a scale of ones, a bias of zeros) is not mistaken for another one. The check runs
once per module when the engine first asks for its rule (on an input of the parameters' own
broadcast shape) and again on the first call with each new input shape (the forward might treat
shapes differently). A forward that modifies its input in place (``x.mul_(gamma)``) is not
recognised: the engine would keep the modified input.

The per-sample gradients, with ``G = dL/dy`` and the sum over every dimension that the parameter
is broadcast along (positions, channels, pixels; never the batch):

    g_i(s) = sum_broadcast (G_i * x_i),      g_i(b) = sum_broadcast G_i.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..factors import Factor, SumFactor

__all__ = ["classify", "elementwise", "elementwise_form"]

# module -> (what the classification depends on, its form or None)
_FORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# module -> input shapes on which its form was confirmed
_CONFIRMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FORMULAS = ("scale", "shift", "scale_shift")


def _key(module: nn.Module) -> tuple:
    return (type(module).forward, tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()))


def _candidates(names: list[str]) -> list[tuple[str | None, str | None]]:
    """(scale name, shift name) assignments to try."""
    if len(names) == 1:
        return [(names[0], None), (None, names[0])]
    a, b = names
    return [(a, b), (b, a)]


def classify(module: nn.Module, shape: tuple[int, ...], args: tuple = (), kwargs: dict | None = None,
             ) -> tuple[str | None, str | None] | None:
    """``(scale name, shift name)`` when ``module``'s forward on an input of ``shape`` (and the other
    arguments ``args``, ``kwargs``) equals ``x * scale + shift`` for random parameters, else None."""
    names = [n for n, _ in module.named_parameters()]
    generator = torch.Generator().manual_seed(0x5EED)  # the user's global generator is left alone
    values = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) + 2.0
              for n, p in module.named_parameters()}
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    probe = x.clone()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, values, (probe, *args), kwargs or {})
    except Exception:  # a forward that cannot run on this probe is simply not recognised
        return None
    if not isinstance(out, torch.Tensor) or probe._version != x._version or out.shape != x.shape:
        return None
    out = out.double()
    for scale, shift in _candidates(names):
        want = x * values[scale] if scale is not None else x
        if shift is not None:
            want = want + values[shift]
        if want.shape == out.shape and torch.allclose(out, want, rtol=1e-9, atol=1e-12):
            return scale, shift
    return None


def elementwise_form(module: nn.Module) -> tuple[str | None, str | None] | None:
    """The ``(scale, shift)`` parameter names of a module recognised as ``y = x * scale + shift``, else None."""
    key = _key(module)
    cached = _FORMS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    form = None
    params = dict(module.named_parameters())
    own = dict(module.named_parameters(recurse=False))
    if 1 <= len(params) <= 2 and params.keys() == own.keys() and all(
            p.requires_grad and p.is_floating_point() for p in params.values()):
        try:
            joint = torch.broadcast_shapes(*(p.shape for p in params.values()))
        except RuntimeError:
            joint = None
        if joint is not None:
            core = list(joint)
            while core and core[0] == 1:  # leading ones are broadcast dimensions (often the batch's)
                core.pop(0)
            form = classify(module, (3, *core))
    _FORMS[module] = (key, form)
    _CONFIRMED.pop(module, None)
    return form


def _per_sample_sums(v: torch.Tensor, shape: torch.Size, name: str, module: nn.Module) -> torch.Tensor:
    """``[B, numel]``: ``v`` ``[B, ...]`` summed over the dimensions a parameter of ``shape`` is broadcast along."""
    b, dims = v.shape[0], v.dim()
    if len(shape) > dims or (len(shape) == dims and shape[0] != 1):
        raise ValueError(f"{type(module).__name__}.{name} has shape {tuple(shape)}, which reaches the batch "
                         f"dimension of the input of shape {tuple(v.shape)}: per-sample gradients need a "
                         "parameter shared by all samples")
    aligned = (1,) * (dims - len(shape)) + tuple(shape)
    return v.sum_to_size(b, *aligned[1:]).reshape(b, -1)


def elementwise(module: nn.Module, inputs: tuple, kwargs: dict, output_grads: tuple) -> dict[str, Factor]:
    """The call rule for a module recognised by :func:`elementwise_form`."""
    form = elementwise_form(module)
    x = inputs[0]
    shapes = _CONFIRMED.setdefault(module, set())
    if tuple(x.shape) not in shapes:
        if form is None or classify(module, tuple(x.shape), inputs[1:], kwargs) != form:
            raise ValueError(
                f"module {type(module).__name__} looked like y = x * scale + shift on a probe input, but on inputs "
                f"of shape {tuple(x.shape)} its output is not that: pass unsupported='reference', or leave it out")
        shapes.add(tuple(x.shape))
    scale, shift = form
    g = output_grads[0].float()
    out: dict[str, Factor] = {}
    if scale is not None:
        p = module.get_parameter(scale)
        out[scale] = SumFactor(_per_sample_sums(g * x.float(), p.shape, scale, module), p.shape, summed=True)
    if shift is not None:
        p = module.get_parameter(shift)
        out[shift] = SumFactor(_per_sample_sums(g, p.shape, shift, module), p.shape, summed=True)
    return out
