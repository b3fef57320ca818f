"""RMSNorm-like modules recognised by structure: ``y = (weight + c) * x / rms(x)``, ``c`` in {0, 1}.

Hugging Face ships one RMSNorm class per model family (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ...; Gemma's multiplies by ``1 + weight``), so they are matched by what they
hold rather than by name: no registered rule, a single trainable 1-d ``weight``, no other
parameters or children with parameters, and a float ``variance_epsilon`` or ``eps``. The
structure alone does not prove the formula, so the engine calls :func:`verify` on the first
captured call of each module: the module's output must equal ``(weight + c) * x / rms(x)`` for
``c = 0`` or ``c = 1``, else it raises naming the module. The per-sample gradient of ``weight``
is then ``g_i = sum_t G_it * xhat_it`` with ``xhat = x / sqrt(mean(x^2) + eps)`` (the offset
``c`` has no gradient).
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
    """``x / sqrt(mean(x^2, last dim) + eps)`` in float32."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def verify(module: nn.Module, activation: torch.Tensor, output: torch.Tensor, name: str) -> None:
    """Check once per module that its output is ``(weight + c) * rms_normalize(x)``; raise otherwise."""
    if module in _VERIFIED:
        return
    weight = module.weight.detach().float()
    with torch.no_grad():
        xhat = rms_normalize(activation, eps_of(module))
        out = output.detach().float()
        scale = out.abs().max().clamp(min=1e-30)
        tol = max(16 * torch.finfo(output.dtype).eps, 1e-5)
        for offset in (0.0, 1.0):
            if ((out - (weight + offset) * xhat).abs().max() / scale).item() <= tol:
                _VERIFIED[module] = offset
                return
    raise ValueError(
        f"module {name!r} ({type(module).__name__}) holds a 1-d weight and an eps like an RMSNorm, but its "
        "output is not weight * x / rms(x) (nor (1 + weight) * x / rms(x)), so no per-sample gradient rule "
        "applies: choose other modules, or pass unsupported='reference'"
    )


def rms_norm_like(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b, d = activation.shape[0], module.weight.shape[0]
    xhat = rms_normalize(activation, eps_of(module)).reshape(b, -1, d)
    return {"weight": SumFactor(output_grad.reshape(b, -1, d) * xhat, module.weight.shape)}


rms_norm_like.verify = verify  # the engine calls it on each module's first captured call


def structural_rule(module: nn.Module):
    """:func:`rms_norm_like` for a module shaped like an RMSNorm, else None."""
    return rms_norm_like if _looks_like_rms_norm(module) else None
