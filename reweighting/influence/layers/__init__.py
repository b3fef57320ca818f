"""Per-layer rules: how a layer's per-sample gradients follow from its input and output gradient.

One small module per layer type, each registering a function with :func:`register`::

    @register(nn.Linear)
    def linear(module, activation, output_grad) -> dict[str, Factor]: ...

``activation`` is the layer's (first) input and ``output_grad`` the gradient of the summed
per-sample losses with respect to its output, both with the batch dimension first. The function
returns one factor (see :mod:`reweighting.influence.factors`) per parameter name it covers. A
layer type that mixes samples (BatchNorm in training mode) is listed in :data:`SAMPLE_MIXING`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..factors import Factor

__all__ = ["register", "register_by_name", "rule_for", "RULES", "COVERED", "Rule", "mixes_samples", "refusal"]

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Factor]]
RULES: dict[type[nn.Module], Rule] = {}
# Rules for layers of optional libraries, by "module.QualifiedName", so the library is never imported here.
NAMED_RULES: dict[str, Rule] = {}
# The parameter names a rule can cover: a layer owning any other trainable parameter has no rule.
COVERED = frozenset({"weight", "bias"})


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


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type or its nearest registered base class, or None."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
        named = NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def mixes_samples(module: nn.Module) -> bool:
    """True for layers whose output for one sample depends on the other samples of the batch."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def refusal(module: nn.Module) -> str | None:
    """Why a registered layer cannot give per-sample gradients in its current configuration, or None."""
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales each gradient by counts over the whole batch (mixes samples)"
        if module.sparse:
            return "sparse=True gradients are not supported"
    return None


# Importing the rule modules registers them.
from . import conv, embedding, hf_conv1d, layernorm, linear  # noqa: E402,F401
