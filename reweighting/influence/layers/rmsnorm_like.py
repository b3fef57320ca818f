"""RMSNorm-like modules recognised by structure: ``y = (weight + c) * x / rms(x)``, ``c`` in {0, 1}.

Hugging Face ships one RMSNorm class per model family (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ...; Gemma's multiplies by ``1 + weight``), so they are matched by what they
hold rather than by name: no registered rule, a single trainable 1-d ``weight``, no other
parameters or children with parameters, and a float ``variance_epsilon`` or ``eps``. The
structure alone does not prove the formula, so the engine calls :func:`verify` on the first
captured call of each module: on random float32 inputs and weights, the module's output must equal
``(weight + c) * x / rms(x)`` for ``c = 0`` or ``c = 1``, else it raises naming the module. The
per-sample gradient of ``weight`` is then ``g_i = sum_t G_it * xhat_it`` with
``xhat = x / sqrt(mean(x^2) + eps)`` (the offset ``c`` has no gradient).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..factors import Factor, SumFactor

__all__ = ["structural_rule", "verify", "eps_of", "rms_normalize"]

# Modules whose formula was checked: module -> offset c.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def eps_of(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float) and not isinstance(value, bool):
            return value
    return None


def _looks_like_rms_norm(module: nn.Module) -> bool:
    params = dict(module.named_parameters())
    weight = params.get("weight")
    return (
        list(params) == ["weight"]
        and weight.dim() == 1
        and weight.requires_grad
        and eps_of(module) is not None
        and not any(True for _ in module.children())
    )


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, last dim) + eps)`` in float32 (float64 for a float64 ``x``)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def verify(module: nn.Module, activation: torch.Tensor, output: torch.Tensor, name: str) -> None:
    """Check once per module that it computes ``(weight + c) * rms_normalize(x)``; raise otherwise.

    The module's own forward is run in float32 on a few random inputs (several scales, so that
    ``eps`` matters, and a non-zero mean, so that a centring norm differs) and random weights, not
    on the model's values: a low-precision output or one weight value could hide a different formula.
    """
    if module in _VERIFIED:
        return
    gen = torch.Generator().manual_seed(0)  # a private stream: the caller's random state is untouched
    d = module.weight.shape[0]
    device = module.weight.device
    eps = eps_of(module)
    found: set[float] = {0.0, 1.0}
    with torch.no_grad():
        for scale in (1.0, 1e-3, 30.0):
            x = ((torch.randn(2, 3, d, generator=gen) + 0.5) * scale).to(device)
            w = (torch.randn(d, generator=gen) * 0.5 + 1.0).to(device)
            try:
                out = torch.func.functional_call(module, {"weight": w}, (x,)).float()
            except Exception as error:  # any failure means the formula is not the one assumed
                raise _mismatch(name, module, f"its forward failed on a float32 input ({error})") from error
            xhat = rms_normalize(x, eps)
            tol = 1e-4 * out.abs().max().clamp(min=1e-30)
            found = {c for c in found if (out - (w + c) * xhat).abs().max() <= tol}
            if not found:
                raise _mismatch(name, module, "its output is not weight * x / rms(x) (nor (1 + weight) * x / "
                                              "rms(x)) on random float32 inputs and weights")
    _VERIFIED[module] = min(found)


def _mismatch(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"module {name!r} ({type(module).__name__}) holds a 1-d weight and an eps like an RMSNorm, but {why}, so no "
        "per-sample gradient rule applies: choose other modules, or pass reference=[...] (or "
        "unsupported='reference') to take its per-sample gradients from autograd"
    )


def rms_norm_like(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b, d = activation.shape[0], module.weight.shape[0]
    xhat = rms_normalize(activation, eps_of(module)).reshape(b, -1, d)
    return {"weight": SumFactor(output_grad.reshape(b, -1, d) * xhat, module.weight.shape)}


rms_norm_like.verify = verify  # the engine calls it on each module's first captured call


def structural_rule(module: nn.Module):
    """:func:`rms_norm_like` for a module shaped like an RMSNorm, else None."""
    return rms_norm_like if _looks_like_rms_norm(module) else None
