"""What the engine reads off the autograd graph: where captured calls end, which nodes lie below
tracked outputs, and whether every use of a watched parameter was captured."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

__all__ = ["REENTRANT", "COMPILED", "is_compiled", "tracked_below", "detach_all", "input_nodes", "output_edges",
           "check_uses", "FunctionalUses"]

REENTRANT = (
    "the model uses reentrant activation checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=True)), "
    "which runs the checkpointed layers without a graph, so their per-sample gradients cannot be formed: use "
    "use_reentrant=False "
    "(Hugging Face: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
)
COMPILED = (
    "torch.compile'd code uses the parameters inside one compiled graph, where the per-layer hooks cannot see them: "
    "give SelfInfluence the eager model (compiled._orig_mod) and run it uncompiled inside capture() (compile only "
    "code that holds no tracked parameter, e.g. the loss on the logits)"
)


def is_compiled(module: nn.Module) -> bool:
    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None


def tracked_below(tracked: set, root) -> dict:
    """For every node reachable from ``root``: whether a node of ``tracked`` lies strictly below it."""
    below: dict = {}
    if root is None:
        return below
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            below[node] = any(child in tracked or below.get(child, False)
                              for child, _ in node.next_functions if child is not None)
            continue
        if node in below:
            continue
        below[node] = False  # visiting (a DAG: no cycles)
        stack.append((node, True))
        stack += [(child, False) for child, _ in node.next_functions
                  if child is not None and child not in below and not hasattr(child, "variable")]
    return below


def detach_all(args: tuple) -> tuple:
    """Detach every tensor argument, keeping identity (``q is k`` stays true)."""
    seen: dict[int, torch.Tensor] = {}
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = seen.setdefault(id(a), a.detach())
        out.append(a)
    return tuple(out)


def input_nodes(values: Iterable) -> set:
    return {v.grad_fn for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None}


def output_edges(outputs: Iterable) -> tuple[list, list]:
    edges, like = [], []
    for o in outputs:
        ok = isinstance(o, torch.Tensor) and o.requires_grad
        edges.append(get_gradient_edge(o) if ok else None)
        like.append((o.shape, o.dtype, o.device) if isinstance(o, torch.Tensor) else None)
    return edges, like


def check_uses(losses: torch.Tensor, actual: dict, calls: list, name_of: Callable[[nn.Parameter], str],
               hint: str = "") -> None:
    """Raise if autograd recorded a use of a watched parameter (``actual``: id of the tensor used ->
    parameter) that no captured call accounts for. ``hint`` ends the message."""
    if not actual or losses.grad_fn is None:
        return
        return
    edges: dict[tuple[int, int], tuple[nn.Parameter, str]] = {}
    seen, stack = set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name == "CheckpointFunctionBackward":
            raise RuntimeError(REENTRANT)
        for i, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            var = getattr(child, "variable", None)
            if var is not None:
                p = actual.get(id(var))
                if p is not None:
                    if "CompiledFunction" in name:
                        raise RuntimeError(f"parameter {name_of(p)!r} is used by {name}: {COMPILED}")
                    edges[(id(node), i)] = (p, name)
            elif child not in seen:
                stack.append(child)
    for c in calls:
        own = set(c.params.values())
        seen_c, stack = set(), [e.node for e in c.edges if e is not None]
        while stack:
            node = stack.pop()
            if node in seen_c or node in c.stops:
                continue
            seen_c.add(node)
            for i, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                var = getattr(child, "variable", None)
                if var is not None:
                    if actual.get(id(var)) in own:
                        edges.pop((id(node), i), None)
                else:
                    stack.append(child)
    if edges:
        p, op = next(iter(edges.values()))
        others = sorted({name_of(q) for q, _ in edges.values()} - {name_of(p)})
        raise RuntimeError(
            f"parameter {name_of(p)!r} is used by an operation ({op}) outside the calls the engine "
            "captured (its module's forward, F.linear, nn.MultiheadAttention), so its per-sample gradient "
            "would be incomplete" + (f"; so are {others}" if others else "") + ". Use it through a module "
            "(e.g. tie an nn.Linear's weight to it, or call F.linear(x, weight)), or leave its modules out "
            "(modules=[...], bookkeeping=False), or pass reference=[module] for their module" + hint
        )


class FunctionalUses(TorchFunctionMode):
    """Passes every ``F.linear`` call made with grad enabled to ``record`` (which keeps those on watched weights)."""

    def __init__(self, record: Callable):
        super().__init__()
        self.record = record  # record(args, kwargs, output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and torch.is_grad_enabled():
            self.record(args, kwargs, out)
        return out
