"""Which layers the engine tracks and how each trainable parameter gets its per-sample gradient.

A plan is a pure function of the model's current state (its modules, which parameters require
grad, the layer rules): the engine makes one at construction and again whenever the set of
trainable parameters or the module structure changes, so a layer frozen or unfrozen later is
counted as it is at each call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from .layers import COVERED, RULES, call_rule_for, covered_names, refusal, rule_for

__all__ = ["Plan", "make_plan", "own_trainable", "rule_params", "signature", "batch_statistics", "sequence_first"]

UNSUPPORTED = ("raise", "reference")


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def rule_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters a module's rule answers for: its own, or its subtree's for a call rule."""
    if call_rule_for(module) is not None:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}
    return own_trainable(module)


def signature(model: nn.Module) -> tuple:
    """What a plan depends on: the module tree and which parameters require grad (host reads only)."""
    return (tuple(map(id, model.modules())),
            tuple(id(p) for p in model.parameters() if p.requires_grad))


def batch_statistics(model: nn.Module, names: dict[nn.Module, str]) -> None:
    """Raise if a layer normalises with statistics of the current batch (every sample's output then
    depends on the others, so per-sample gradients are not defined)."""
    for m, name in names.items():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if m.training or m.running_mean is None:
            why = ("is in training mode" if m.training else
                   "has track_running_stats=False, so it uses batch statistics even in eval mode")
            raise ValueError(
                f"module {name or '<model>'!r} ({type(m).__name__}) {why}: each sample's output depends on the "
                "whole batch, so per-sample gradients are not defined. Put it in eval mode with running "
                "statistics (track_running_stats=True, module.eval()), or use GroupNorm/LayerNorm instead"
            )


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def sequence_first(names: dict[nn.Module, str]) -> None:
    """Raise if a layer with parameters runs inside a torch Transformer layer built sequence-first
    (``batch_first=False``, the default): its inputs are ``[T, B, ...]``, and when ``T`` equals ``B`` no
    shape check could tell (other sequence-first code is caught by the run-time verification)."""
    for m, name in names.items():
        if not isinstance(m, _TRANSFORMER_LAYERS) or not any(
                isinstance(c, nn.MultiheadAttention) and not c.batch_first for c in m.children()):
            continue
        in_attention = {id(c) for a in m.modules() if isinstance(a, nn.MultiheadAttention) for c in a.modules()}
        inner = [n for n, c in m.named_modules(prefix=name) if c is not m and id(c) not in in_attention
                 and own_trainable(c)]
        if inner:
            raise ValueError(
                f"module {name or '<model>'!r} ({type(m).__name__}) is built with batch_first=False, so its "
                f"layers ({inner[0]!r}, ...) see sequence-first inputs [T, B, ...], while the per-sample rules "
                "need the batch first: build it with batch_first=True (and feed [B, T, ...])"
            )


@dataclass
class Plan:
    chosen: list  # the parameters K whose norms are asked for
    fallback: list  # chosen parameters whose per-sample gradients come from autograd
    norm_params: list  # chosen parameters with a rule
    tracked: list  # modules whose calls are captured
    bookkept: list  # parameters the factor update covers
    second: list  # trainable parameters updated by a second backward
    module_params: dict  # tracked module -> {rule's parameter name: parameter}
    broadcast: set


def resolve(model: nn.Module, modules, names: dict[nn.Module, str], allow_empty: bool = False) -> list[nn.Module]:
    if modules is None:
        return [m for m in names if own_trainable(m)]
    by_name = dict(model.named_modules())
    out = []
    for m in modules:
        if isinstance(m, str):
            if m not in by_name:
                raise ValueError(f"modules names {m!r}, which is not a module of the model")
            m = by_name[m]
        elif m not in names:
            raise ValueError(f"modules contains a {type(m).__name__} that is not part of the model")
        if not own_trainable(m) and not allow_empty:
            raise ValueError(
                f"module {names[m]!r} ({type(m).__name__}) has no trainable parameters of its own (now: a module "
                "frozen after SelfInfluence was made counts as it is at each call); name its sub-modules "
                "(e.g. [m for m in module.modules()]) or choose trainable ones"
            )
        out.append(m)
    if not out and not allow_empty:
        raise ValueError("modules is empty: choose at least one module")
    return list(dict.fromkeys(out))


def make_plan(model: nn.Module, modules: Iterable | None, broadcast: Iterable, reference: Iterable, bookkeeping: bool,
              unsupported: str, names: dict[nn.Module, str]) -> Plan:
    """Decide, for the model as it is now, which modules to track and how each parameter is served
    (``reference`` modules: by autograd)."""
    chosen_modules = resolve(model, modules, names)
    broadcast_modules = set(resolve(model, broadcast, names, allow_empty=True))
    by_autograd = set(resolve(model, reference, names, allow_empty=True))
    sequence_first(names)
    # owners[p]: the modules whose rule would answer for p (call-rule modules for their subtree too).
    owners: dict[nn.Parameter, list[nn.Module]] = {}
    for m in names:
        for p in rule_params(m).values():
            if m not in owners.setdefault(p, []):
                owners[p].append(m)

    def has_rule(m: nn.Module) -> bool:
        return rule_for(m) is not None or call_rule_for(m) is not None

    def ruled(m: nn.Module) -> bool:
        if m in by_autograd:
            return False
        if call_rule_for(m) is not None:
            return refusal(m) is None and set(rule_params(m)) <= covered_names(m)
        return rule_for(m) is not None and refusal(m) is None and set(own_trainable(m)) <= COVERED

    for m in chosen_modules:
        reason = refusal(m) if has_rule(m) else None
        if reason is not None:
            raise ValueError(f"module {names[m] or '<model>'!r} ({type(m).__name__}) is refused: {reason}")
    chosen = list(dict.fromkeys(p for m in chosen_modules for p in own_trainable(m).values()))
    fallback = [p for p in chosen if not all(ruled(m) for m in owners[p])]
    if fallback and unsupported == "raise" and any(
            m not in by_autograd for p in fallback for m in owners[p] if not ruled(m)):
        bad = [m for p in fallback for m in owners[p] if not ruled(m) and m not in by_autograd]
        listed = ", ".join(f"{names[m] or '<model>'!r} ({type(m).__name__}"
                           + (f": {refusal(m)}" if has_rule(m) and refusal(m) else "") + ")"
                           for m in dict.fromkeys(bad))
        known = ", ".join(sorted(t.__name__ for t in RULES) + ["MultiheadAttention", "RMSNorm-like modules"])
        raise ValueError(
            f"no per-sample gradient rule for module(s) {listed} with trainable parameters; supported "
            f"layers: {known}. Choose other modules, or pass unsupported='reference' to take their "
            "per-sample gradients from autograd (exact but slower)"
        )
    fallback_ids = set(fallback)
    needed = {p for p in chosen if p not in fallback_ids}
    tracked_set = {m for p in needed for m in owners[p] if ruled(m)}
    if bookkeeping:
        tracked_set |= {m for ms in owners.values() for m in ms if ruled(m)}
    tracked = [m for m in names if m in tracked_set]
    bookkept = [p for p, ms in owners.items() if all(m in tracked_set and ruled(m) for m in ms)]
    kept_ids = set(bookkept)
    return Plan(
        chosen=chosen, fallback=fallback, norm_params=[p for p in chosen if p not in fallback_ids],
        tracked=tracked, bookkept=bookkept, second=[p for p in owners if p not in kept_ids],
        # The parameters each tracked module's rule answers for, by name (FSDP2 swaps the attributes
        # between sharded and unsharded tensors, so the objects are resolved here).
        module_params={m: rule_params(m) for m in tracked}, broadcast=broadcast_modules,
    )
