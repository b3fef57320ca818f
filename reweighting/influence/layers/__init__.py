"""Per-layer rules: how a layer's per-sample gradients follow from its input and output gradient.

One small module per layer type, each registering a function with :func:`register`::

    @register(nn.Linear)
    def linear(module, activation, output_grad) -> dict[str, Factor]: ...

``activation`` is the layer's (first) input and ``output_grad`` the gradient of the summed
per-sample losses with respect to its output, both with the batch dimension first. The function
returns one factor (see :mod:`reweighting.influence.factors`) per parameter name it covers. A
layer type that mixes samples (BatchNorm in training mode) is refused by :func:`mixes_samples`.

Layers whose parameters cannot be read off one input and one output gradient (attention: the
projections act on intermediate tensors) register a *call rule* with :func:`register_call`: it
receives every tensor argument of the call, its keyword arguments and the output gradients, and
may cover the parameters of the layer's children (``out_proj.weight``). Modules of no registered
type that hold a single 1-d ``weight`` and an ``eps`` (Hugging Face's ``LlamaRMSNorm``,
``Qwen2RMSNorm``, ...) are recognised by :func:`structural_rule` and checked numerically on use;
so are modules that only scale and shift their input by broadcast parameters (LayerScale, a free
bias, a learned scale: ``y = x * s + b``, see :mod:`.elementwise`), which get a call rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from ..factors import Factor

__all__ = ["register", "register_by_name", "register_call", "rule_for", "call_rule_for", "covered_names", "RULES",
           "CALL_RULES", "COVERED", "Rule", "CallRule", "mixes_samples", "refusal"]

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Factor]]
RULES: dict[type[nn.Module], Rule] = {}
# Rules for layers of optional libraries, by "module.QualifiedName", so the library is never imported here.
NAMED_RULES: dict[str, Rule] = {}
# The parameter names a rule can cover: a layer owning any other trainable parameter has no rule.
COVERED = frozenset({"weight", "bias"})

# rule(module, inputs, kwargs, output_grads) -> {parameter name relative to the module: factor}
CallRule = Callable[[nn.Module, tuple, dict, tuple], dict[str, Factor]]
CALL_RULES: dict[type[nn.Module], CallRule] = {}
# The parameter names (relative to the module, children included) each call rule can cover.
CALL_COVERED: dict[type[nn.Module], frozenset[str]] = {}


def register(*types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register ``rule`` for the given module types (subclasses use it too)."""

    def add(rule: Rule) -> Rule:
        for t in types:
            RULES[t] = rule
        return rule

    return add


def register_by_name(*qualified_names: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` for classes named ``"package.module.ClassName"`` (and their subclasses)."""

    def add(rule: Rule) -> Rule:
        for name in qualified_names:
            NAMED_RULES[name] = rule
        return rule

    return add


def register_call(*types: type[nn.Module], covers: Iterable[str]) -> Callable[[CallRule], CallRule]:
    """Register a call rule for ``types``; ``covers`` names the parameters (children's included) it handles."""

    def add(rule: CallRule) -> CallRule:
        for t in types:
            CALL_RULES[t] = rule
            CALL_COVERED[t] = frozenset(covers)
        return rule

    return add


def _registered(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            # A subclass with its own forward may use the weights otherwise than the rule assumes.
            return rule if type(module).forward is cls.forward else None
    return None


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type or its nearest registered base class, else a structural rule
    (an RMSNorm-like module, see :mod:`.rmsnorm_like`), or None."""
    rule = _registered(module)
    if rule is None and call_rule_for(module) is None:
        rule = structural_rule(module)
    return rule


def call_rule_for(module: nn.Module) -> CallRule | None:
    """The call rule for ``module``'s type or its nearest registered base class, else the
    elementwise rule for a module computing ``x * scale + shift`` (see :mod:`.elementwise`), or None."""
    for cls in type(module).__mro__:
        if cls in CALL_RULES:
            return CALL_RULES[cls]
    if _registered(module) is None and elementwise_form(module) is not None:
        return elementwise
    return None


def covered_names(module: nn.Module) -> frozenset[str]:
    """The parameter names the rule of ``module`` covers (children's for a call rule)."""
    for cls in type(module).__mro__:
        if cls in CALL_COVERED:
            return CALL_COVERED[cls]
    if _registered(module) is None:
        form = elementwise_form(module)
        if form is not None:
            return frozenset(n for n in form if n is not None)
    return COVERED


def mixes_samples(module: nn.Module) -> bool:
    """True for layers whose output for one sample depends on the other samples of the batch."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def refusal(module: nn.Module) -> str | None:
    """Why a registered layer cannot give per-sample gradients in its current configuration, or None."""
    if isinstance(module, nn.MultiheadAttention):
        return mha_refusal(module)
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales each gradient by counts over the whole batch (mixes samples)"
        if module.sparse:
            return "sparse=True gradients are not supported"
    return None


# Importing the rule modules registers them.
from . import conv, embedding, hf_conv1d, layernorm, linear, mha  # noqa: E402,F401
from .elementwise import elementwise, elementwise_form  # noqa: E402
from .mha import mha_refusal  # noqa: E402
from .rmsnorm_like import structural_rule  # noqa: E402
