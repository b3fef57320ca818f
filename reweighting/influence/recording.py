"""The forward hooks with which :meth:`SelfInfluence.capture` records the calls of the tracked layers.

Each call of a tracked layer, and each ``F.linear`` call on a tracked weight outside its module,
becomes a :class:`~.passes.Call`: the parameters it used, its input, where its output entered the
autograd graph, and the layout that the verification compares. The hooks are the methods of
:class:`CallRecorder`, a base class of :class:`~reweighting.influence.SelfInfluence`, and work on
that object's capture state."""

from __future__ import annotations

import functools
import types

import torch
import torch.nn as nn

from .graph import COMPILED, detach_all, input_nodes, output_edges
from .layers import call_rule_for, rule_for
from .passes import Call, symbols


class CallRecorder:
    """The capture hooks of :class:`~reweighting.influence.SelfInfluence`, its base class: they read and
    fill the capture state it sets up (``_calls``, ``_batch_size``, ``_running``, ``_actual``, ...)."""

    def _model_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's first batched input gives the batch size for broadcast modules that run before
        any tracked layer (a position table after a frozen token embedding)."""
        if self._input_batch is None:
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
            self._input_batch = None if first is None else first.shape[0]

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._running.append(module)
        # The tensors this call will use: under FSDP2 these are the unsharded parameters.
        for name, p in self._module_params[module].items():
            actual = module.get_parameter(name) if "." in name else getattr(module, name, None)
            if isinstance(actual, torch.Tensor) and actual is not p:
                self._actual[id(actual)] = p

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> torch.Tensor | None:
        if self._running and self._running[-1] is module:
            self._running.pop()
        if not torch.is_grad_enabled():
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(f"module {self._names[module]!r} runs inside torch.compile: {COMPILED}")
        params = self._module_params[module]
        if call_rule_for(module) is not None:
            outs = output if isinstance(output, tuple) else (output,)
            if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
                return None
            batch = args[0].shape[0] if getattr(module, "batch_first", True) else args[0].shape[1]
            if self._batch_size is None:
                self._batch_size = batch
            inputs = detach_all(args)
            self._calls.append(Call(
                self._names[module], module, params, *output_edges(outs),
                stops=input_nodes(args) | input_nodes(kwargs.values()), activation=inputs[0],
                version=inputs[0]._version, inputs=inputs, kwargs=dict(kwargs), call_rule=True,
                layout=(symbols(args[0].shape, self._batch_size), args[0].dtype)))
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        raw = args[0] if args else next(iter(kwargs.values()))
        activation = raw.detach()
        if module not in self._first_use_checked:
            check = getattr(rule_for(module), "verify", None)
            if check is not None:
                check(module, activation, output, self._names[module])
            self._first_use_checked.add(module)
        layout = (symbols(activation.shape, self._batch_size), activation.dtype)
        expanded = module in self._broadcast and self._broadcast_form(module, activation) != "batched"
        if expanded:
            b = self._batch_size
            if activation.dim() >= 2:  # a batch dimension of one, e.g. [1, T]
                output = output.expand(b, *output.shape[1:])
                activation = activation.expand(b, *activation.shape[1:])
            else:  # no batch dimension: [T]
                output = output.unsqueeze(0).expand(b, *output.shape)
                activation = activation.unsqueeze(0).expand(b, *activation.shape)
            layout = ("broadcast",) + layout
        elif self._batch_size is None:
            self._batch_size = activation.shape[0]
            layout = (symbols(activation.shape, self._batch_size), activation.dtype)
        self._record(Call(self._names[module], module, params, *output_edges([output]),
                           stops=input_nodes(args) | input_nodes(kwargs.values()), activation=activation,
                           version=raw._version, layout=layout), output)
        return output if expanded else None

    def _broadcast_form(self, module: nn.Module, x: torch.Tensor) -> str:
        """How a ``broadcast`` module was called: ``"unbatched"`` (``[T]`` or ``[1, ...]``, to expand)
        or ``"batched"`` (``[B, ...]``, an ordinary call); anything else raises."""
        name = self._names[module]
        if self._batch_size is None:
            self._batch_size = self._input_batch
        b = self._batch_size
        if b is None:
            raise RuntimeError(f"broadcast module {name!r} ran before any batched layer: pass the batch size "
                               "to capture(batch_size=...)")
        if x.dim() >= 2 and x.shape[0] == 1:
            return "unbatched"
        if x.dim() >= 2 and x.shape[0] == b:
            return "batched"
        if x.dim() == 1:
            return "unbatched"
        raise ValueError(
            f"broadcast module {name!r} ({type(module).__name__}) was called on an input of shape {tuple(x.shape)}, "
            f"which is neither unbatched [T] or [1, ...] nor batched [{b}, ...]: its output cannot be expanded over "
            "the batch without changing the shape its caller expects. Take it out of broadcast= and put it in "
            "reference=[...] (its per-sample gradients then come from autograd)"
        )

    def _functional_linear(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Record ``F.linear(x, W, b)`` on a watched ``W`` called outside the module that owns it."""
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        p = self._actual.get(id(weight))
        if p is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        if self._running and any(t is weight for t in self._running[-1]._parameters.values()):
            return  # the owning module's own call: its hook sees it
        params = {"weight": p}
        if bias is not None and id(bias) in self._actual:
            params["bias"] = self._actual[id(bias)]
        owner = types.SimpleNamespace(weight=weight, bias=bias if "bias" in params else None,
                                      in_features=weight.shape[1], out_features=weight.shape[0])
        if self._batch_size is None:
            self._batch_size = x.shape[0]
        self._record(Call(f"F.linear(..., {self._name_of(p)})", owner, params, *output_edges([out]),
                           stops=input_nodes([x]), activation=x.detach(), version=x._version,
                           layout=(symbols(x.shape, self._batch_size), x.dtype)), out)

    def _record(self, call: Call, output: torch.Tensor) -> None:
        call.hook = output.register_hook(functools.partial(self._arrived, call))
        self._calls.append(call)
