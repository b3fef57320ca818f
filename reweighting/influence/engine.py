"""Exact per-sample squared gradient norms from one forward and one backward pass.

Usage (the contract: ``losses`` are **per-sample** losses ``[B]``, each depending on its own
sample only, batch dimension first everywhere)::

    si = SelfInfluence(model)                 # or modules=[model.blocks[0], ...]
    with si.capture():
        losses = per_sample_loss(model, batch)  # [B], e.g. reweighting.sequence_loss(...)
    sq_norms = si.norms(losses)               # [B]: ||grad_K l_i||^2, no .grad touched
    si.weighted_backward(weights)             # .grad += sum_i w_i grad l_i (book-keeping)

``capture`` stores each tracked layer's input; ``norms`` runs one backward of ``sum_i l_i`` (the
sum, not the mean, so that the output gradient of sample ``i`` is exactly that of ``l_i``) with
respect to the layer *outputs* only, which skips every weight-gradient product of a normal
backward, and turns the inputs and output gradients into per-sample norms layer by layer
(METHODS.md section 2: the ghost form ``sum((A_i A_i^T) * (G_i G_i^T))`` or the materialised
``A_i^T G_i``, whichever is cheaper). A parameter shared between modules (tied embeddings) has its
uses' per-sample gradients summed before the norm, so the cross terms are exact. Each layer's
output gradient is turned into its factors by a gradient hook as soon as autograd computes it
(the engine holds where each output entered the graph, not the output), so that the working
memory stays near a plain backward's.

``weighted_backward`` forms ``sum_i w_i A_i^T G_i`` (and the bias, embedding and LayerNorm
analogues) from the same stored tensors and adds it to ``.grad`` without a second backward pass.
Parameters that no rule covers (of modules without a rule, or used by one) are updated by a
second backward of ``sum_i w_i l_i`` restricted to them; :meth:`norms` then keeps the graph.

Every use of a parameter is accounted for. Besides module calls, ``F.linear`` calls on a tracked
weight made outside its module (a tied output layer ``F.linear(h, wte.weight)``) are captured as
uses of their own, and ``nn.MultiheadAttention`` has a call rule. :meth:`norms` then walks the
autograd graph of the losses and compares, per parameter, the uses autograd recorded with those a
rule saw; any other use (another functional op on the weight, a ``torch.compile``'d region,
reentrant activation checkpointing) raises naming the parameter and what to do, rather than
giving a wrong norm. Non-reentrant checkpointing (``use_reentrant=False``) works as it is.
``torch.compile`` is detected and refused: pass the eager model (``compiled._orig_mod``).

Under ``torch.distributed`` the gradients written by :meth:`weighted_backward` are summed over
ranks (with weights normalised over the global batch this is the global ``sum_i w_i grad l_i``):
one all-reduce of all plain gradients, and for ``DTensor`` parameters (FSDP2's ``fully_shard``)
a reduce-scatter into gradients of the parameter's own placement. Every rank contributes every
parameter (zeros where a module did not run there), so ranks that use different modules stay
in step. With DDP, run the forward under ``ddp_model.no_sync()`` (or capture the inner module)
so that DDP does not expect a backward of its own.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from .. import distributed as D
from ..checks import check_batch, check_finite, check_same_length, checks_enabled
from .factors import Factor, OuterFactor, sq_norms, tied_sq_norms
from .layers import COVERED, RULES, call_rule_for, covered_names, mixes_samples, refusal, rule_for
from .layers.embedding import embedding as _embedding_rule
from .layers.hf_conv1d import hf_conv1d as _hf_conv1d_rule
from .layers.layernorm import layer_norm as _layer_norm_rule
from .layers.linear import linear as _linear_rule
from .layers.rmsnorm_like import rms_norm_like as _rms_norm_like_rule
from .reference import batched_autograd_grads

__all__ = ["SelfInfluence", "microbatch_sizes"]

UNSUPPORTED = ("raise", "reference")
# Rules whose per-sample gradient is a sum over positions of per-position terms.
_POSITIONWISE = {_linear_rule, _embedding_rule, _hf_conv1d_rule, _layer_norm_rule, _rms_norm_like_rule}
if hasattr(nn, "RMSNorm"):
    from .layers.layernorm import rms_norm as _rms_norm_rule

    _POSITIONWISE.add(_rms_norm_rule)
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


def microbatch_sizes(batch: int, microbatches: int) -> list[int]:
    """Sizes of ``microbatches`` contiguous chunks of a batch (as ``torch.tensor_split``)."""
    if not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches must be between 1 and the batch size {batch}, got {microbatches}")
    base, extra = divmod(batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)


def _own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _rule_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters a module's rule answers for: its own, or its subtree's for a call rule."""
    if call_rule_for(module) is not None:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}
    return _own_trainable(module)


def _is_compiled(module: nn.Module) -> bool:
    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None


@dataclass
class _Call:
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


@dataclass
class _Pass:
    """The state of one :meth:`SelfInfluence.norms` call while output gradients arrive."""

    b: int
    sizes: list[int] | None
    total: torch.Tensor
    room: int
    norm_params: set
    documents: torch.Tensor | None = None  # [rows, positions] document ids of packed rows
    target: torch.Tensor | None = None  # each position's flat index in [documents, positions]
    remaining: dict = field(default_factory=dict)  # parameter -> uses whose gradient has not arrived
    factors: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)


def _positionwise(c: _Call) -> bool:
    """Rules whose per-sample gradient is a sum of per-position terms (so positions can be regrouped)."""
    if isinstance(c.module, types.SimpleNamespace):
        return True
    return rule_for(c.module) in _POSITIONWISE


def document_index(documents: torch.Tensor, n: int) -> torch.Tensor:
    """``[rows * positions]``: where each position of a packed batch goes in ``[n + 1, positions]``.

    Document ``d``'s tokens keep their positions, in row ``d`` (a document lies in one row, so its
    positions are distinct); padding (id -1) goes to the spare row ``n``. Static shapes only.
    """
    r, t = documents.shape
    pos = torch.arange(t, device=documents.device).expand(r, t)
    return torch.where(documents >= 0, documents * t + pos, n * t + pos).reshape(-1)


def check_documents(documents: torch.Tensor, n: int) -> None:
    """Document ids ``[rows, positions]``: integers in ``[-1, n)``, each document one contiguous run in one row."""
    if not isinstance(documents, torch.Tensor) or documents.dim() != 2 or documents.is_floating_point():
        raise ValueError("documents must be an integer tensor [rows, positions] of document ids (-1: padding), "
                         f"got {getattr(documents, 'dtype', type(documents).__name__)} of shape "
                         f"{tuple(getattr(documents, 'shape', ()))}")
    if not checks_enabled():
        return
    if bool((documents < -1).any()) or bool((documents >= n).any()):
        raise ValueError(f"documents ids must be in [-1, {n}) for {n} per-document losses, got values from "
                         f"{int(documents.min())} to {int(documents.max())}")
    prev = torch.cat([torch.full_like(documents[:, :1], -2), documents[:, :-1]], 1)
    starts = documents[(documents != prev) & (documents >= 0)]
    runs = torch.bincount(starts, minlength=n)
    if bool((runs != 1).any()):
        bad = torch.nonzero(runs != 1).reshape(-1)[:5].tolist()
        raise ValueError(f"documents {bad} are empty, split into several runs, or span rows: each document must be "
                         "one contiguous run of positions in one row")


def _by_document(t: torch.Tensor, state: _Pass) -> torch.Tensor:
    """``[rows, positions, ...]`` to ``[documents, positions, ...]`` (zeros after a document's end)."""
    n, positions = state.b, state.documents.shape[1]
    out = t.new_zeros((n + 1) * positions, *t.shape[2:])
    out.index_copy_(0, state.target, t.reshape(-1, *t.shape[2:]))
    return out.reshape(n + 1, positions, *t.shape[2:])[:n]


def _tracked_below(tracked: set, root) -> dict:
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


def _detach_all(args: tuple) -> tuple:
    """Detach every tensor argument, keeping identity (``q is k`` stays true)."""
    seen: dict[int, torch.Tensor] = {}
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = seen.setdefault(id(a), a.detach())
        out.append(a)
    return tuple(out)


def _stops(values: Iterable) -> set:
    return {v.grad_fn for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None}


def _edges(outputs: Iterable) -> tuple[list, list]:
    edges, like = [], []
    for o in outputs:
        ok = isinstance(o, torch.Tensor) and o.requires_grad
        edges.append(get_gradient_edge(o) if ok else None)
        like.append((o.shape, o.dtype, o.device) if isinstance(o, torch.Tensor) else None)
    return edges, like


class _FunctionalUses(TorchFunctionMode):
    """Captures ``F.linear`` calls on a watched weight made outside the module that owns it."""

    def __init__(self, engine: SelfInfluence):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and torch.is_grad_enabled():
            self.engine._functional_linear(args, kwargs, out)
        return out


class SelfInfluence:
    """Per-sample squared gradient norms ``SI_i = ||grad_K l_i||^2`` restricted to the parameters
    ``K`` of ``modules`` (default: every module with trainable parameters).

    - ``modules``: modules or their qualified names in ``model``.
    - ``bookkeeping``: also track every other supported layer, so that :meth:`weighted_backward`
      covers all parameters without a second backward (set False when only norms are wanted:
      the backward then stops at the earliest chosen layer).
    - ``broadcast``: modules called without a batch dimension (or with one of size 1) whose output
      is broadcast over the batch (a position embedding called on ``arange(T)`` or ``[1, T]``).
      During capture their output is expanded to ``[B, ...]`` (a view, no copy) so that each
      sample's output gradient is kept.
    - ``unsupported``: ``"raise"`` (default) for a chosen module with parameters but no rule;
      ``"reference"`` takes those parameters' per-sample gradients from autograd instead
      (exact, materialised, slower).
    - ``max_kept_bytes``: per-sample gradients that were materialised for the norms are kept, up
      to this many bytes, and reused by :meth:`weighted_backward` (a weighted sum instead of a
      product over positions); 0 keeps none.
    - ``functional``: capture ``F.linear`` calls on tracked weights outside their modules (a
      ``TorchFunctionMode`` over the forward, which costs some Python time per operation).
      ``None`` (default) watches the first capture and keeps watching only if such a use was
      seen; ``True`` always; ``False`` never. A use nothing captured always raises in :meth:`norms`.

    Layers that mix samples (BatchNorm in training mode) are refused when capturing; so are
    compiled models (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[nn.Module | str] | None = None,
        *,
        bookkeeping: bool = True,
        broadcast: Iterable[nn.Module | str] = (),
        unsupported: str = "raise",
        max_kept_bytes: int = 2**30,
        functional: bool | None = None,
        group=None,
    ):
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
        compiled = [n or "<model>" for n, m in model.named_modules() if _is_compiled(m)]
        if compiled:
            raise ValueError(f"model: module(s) {compiled[:5]} are compiled; {COMPILED}")
        self.model = model
        self.group = group
        names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        chosen = self._resolve(model, modules, names)
        self._broadcast = set(self._resolve(model, broadcast, names, allow_empty=True))

        # owners[p]: the modules whose rule would answer for p (call-rule modules for their subtree too).
        owners: dict[nn.Parameter, list[nn.Module]] = {}
        for m in names:
            params = _own_trainable(m)
            if call_rule_for(m) is not None:
                params = _rule_params(m)
            for p in params.values():
                if m not in owners.setdefault(p, []):
                    owners[p].append(m)

        def has_rule(m: nn.Module) -> bool:
            return rule_for(m) is not None or call_rule_for(m) is not None

        def ruled(m: nn.Module) -> bool:
            if call_rule_for(m) is not None:
                return refusal(m) is None and set(_rule_params(m)) <= covered_names(m)
            return rule_for(m) is not None and refusal(m) is None and set(_own_trainable(m)) <= COVERED

        for m in chosen:
            reason = refusal(m) if has_rule(m) else None
            if reason is not None:
                raise ValueError(f"module {names[m] or '<model>'!r} ({type(m).__name__}) is refused: {reason}")
        chosen_params = [p for m in chosen for p in _own_trainable(m).values()]
        self._chosen = list(dict.fromkeys(chosen_params))
        self._fallback = [p for p in self._chosen if not all(ruled(m) for m in owners[p])]
        if self._fallback and unsupported == "raise":
            bad = [m for p in self._fallback for m in owners[p] if not ruled(m)]
            listed = ", ".join(f"{names[m] or '<model>'!r} ({type(m).__name__}"
                               + (f": {refusal(m)}" if has_rule(m) and refusal(m) else "") + ")"
                               for m in dict.fromkeys(bad))
            known = ", ".join(sorted(t.__name__ for t in RULES) + ["MultiheadAttention", "RMSNorm-like modules"])
            raise ValueError(
                f"no per-sample gradient rule for module(s) {listed} with trainable parameters; supported "
                f"layers: {known}. Choose other modules, or pass unsupported='reference' to take their "
                "per-sample gradients from autograd (exact but slower)"
            )
        fallback_ids = set(self._fallback)
        needed = {p for p in self._chosen if p not in fallback_ids}
        tracked = {m for p in needed for m in owners[p] if ruled(m)}
        if bookkeeping:
            tracked |= {m for ms in owners.values() for m in ms if ruled(m)}
        self._tracked = [m for m in names if m in tracked]
        self._names = names
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._norm_params = [p for p in self._chosen if p not in fallback_ids]
        # Parameters the book-keeping update covers: every use is by a tracked layer with a rule.
        self._bookkept = [p for p, ms in owners.items() if all(m in tracked and ruled(m) for m in ms)]
        bookkept = set(self._bookkept)
        self._second = [p for p in owners if p not in bookkept]
        # The parameters each tracked module's rule answers for, by name (FSDP2 swaps the attributes
        # between sharded and unsharded tensors, so the objects are resolved once, here).
        self._module_params = {m: _rule_params(m) for m in self._tracked}
        self._watched = set(self._norm_params) | bookkept
        self._actual: dict[int, nn.Parameter] = {id(p): p for p in self._watched}
        self._calls: list[_Call] = []
        self._running: list[nn.Module] = []
        self._first_use_checked: set[nn.Module] = set()
        self._factors: dict[nn.Parameter, list[Factor]] | None = None
        self._kept: dict[nn.Parameter, torch.Tensor] = {}
        self.max_kept_bytes = int(max_kept_bytes)
        self._losses: torch.Tensor | None = None
        self._graph_kept = False
        self._batch_size: int | None = None
        self._state: _Pass | None = None
        self.functional = functional
        self._functional_seen: bool | None = None  # None: not yet watched
        self._watching = False

    @staticmethod
    def _resolve(model: nn.Module, modules, names: dict[nn.Module, str], allow_empty: bool = False) -> list[nn.Module]:
        if modules is None:
            return [m for m in names if _own_trainable(m)]
        by_name = dict(model.named_modules())
        out = []
        for m in modules:
            if isinstance(m, str):
                if m not in by_name:
                    raise ValueError(f"modules names {m!r}, which is not a module of the model")
                m = by_name[m]
            elif m not in names:
                raise ValueError(f"modules contains a {type(m).__name__} that is not part of the model")
            if not _own_trainable(m):
                raise ValueError(
                    f"module {names[m]!r} ({type(m).__name__}) has no trainable parameters of its own; "
                    "name its sub-modules (e.g. [m for m in module.modules()])"
                )
            out.append(m)
        if not out and not allow_empty:
            raise ValueError("modules is empty: choose at least one module")
        return list(dict.fromkeys(out))

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters ``K`` whose per-sample gradient norms are computed."""
        return list(self._chosen)

    @property
    def second_backward_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that :meth:`weighted_backward` updates by a second backward pass."""
        return list(self._second)

    def _name_of(self, p: nn.Parameter) -> str:
        return self._param_names.get(p, "<unnamed parameter>")

    # -- capture ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self, batch_size: int | None = None) -> Iterator[SelfInfluence]:
        """Record the inputs and outputs of the tracked layers during the forward passes inside.

        ``batch_size`` is needed only when a ``broadcast`` module runs before any batched layer;
        otherwise it is read from the first batched layer's input.
        """
        for m, name in self._names.items():
            if mixes_samples(m):
                raise ValueError(
                    f"module {name!r} ({type(m).__name__}) mixes samples in training mode, so per-sample "
                    "gradients are not defined; use eval mode, GroupNorm/LayerNorm, or freeze its statistics"
                )
        self.clear()
        self._batch_size = batch_size
        self._running = []
        # Tensors standing in for parameters are recorded afresh each capture (an id may be reused).
        self._actual = {id(p): p for p in self._watched}
        handles = []
        for m in dict.fromkeys(self._tracked):
            handles.append(m.register_forward_pre_hook(self._pre_hook))
            handles.append(m.register_forward_hook(self._hook, with_kwargs=True, always_call=True))
        watch = self.functional is True or (self.functional is None and self._functional_seen is not False)
        self._watching = watch
        try:
            with _FunctionalUses(self) if watch else contextlib.nullcontext():
                yield self
            if self.functional is None and watch:
                # Keep watching only where a functional use was seen (the check in norms() still
                # raises on a use that a later step makes and nothing captured).
                self._functional_seen = any(isinstance(c.module, types.SimpleNamespace) for c in self._calls)
        finally:
            for h in handles:
                h.remove()
            self._running = []

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
            inputs = _detach_all(args)
            self._calls.append(_Call(
                self._names[module], module, params, *_edges(outs), stops=_stops(args) | _stops(kwargs.values()),
                activation=inputs[0], version=inputs[0]._version, inputs=inputs, kwargs=dict(kwargs),
                call_rule=True))
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
        if module in self._broadcast:
            if self._batch_size is None:
                raise RuntimeError(
                    f"broadcast module {self._names[module]!r} ran before any batched layer: "
                    "pass the batch size to capture(batch_size=...)"
                )
            b = self._batch_size
            if activation.dim() >= 2 and activation.shape[0] == 1:  # a batch dimension of one, e.g. [1, T]
                output = output.expand(b, *output.shape[1:])
                activation = activation.expand(b, *activation.shape[1:])
            else:  # no batch dimension, e.g. [T]
                output = output.unsqueeze(0).expand(b, *output.shape)
                activation = activation.unsqueeze(0).expand(b, *activation.shape)
        elif self._batch_size is None:
            self._batch_size = activation.shape[0]
        self._record(_Call(self._names[module], module, params, *_edges([output]),
                           stops=_stops(args) | _stops(kwargs.values()), activation=activation, version=raw._version),
                     output)
        return output if module in self._broadcast else None

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
        self._record(_Call(f"F.linear(..., {self._name_of(p)})", owner, params, *_edges([out]),
                           stops=_stops([x]), activation=x.detach(), version=x._version), out)

    def _record(self, call: _Call, output: torch.Tensor) -> None:
        call.hook = output.register_hook(functools.partial(self._arrived, call))
        self._calls.append(call)

    def clear(self) -> None:
        """Drop the stored activations, output gradients and graph references."""
        self._calls = []
        self._factors = None
        self._kept = {}
        self._losses = None
        self._graph_kept = False

    # -- the use check ----------------------------------------------------------------------------

    def _check_uses(self, losses: torch.Tensor) -> None:
        """Raise if autograd recorded a use of a watched parameter that no captured call accounts for."""
        if not self._watched or losses.grad_fn is None:
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
                    p = self._actual.get(id(var))
                    if p is not None:
                        if "CompiledFunction" in name:
                            raise RuntimeError(f"parameter {self._name_of(p)!r} is used by {name}: {COMPILED}")
                        edges[(id(node), i)] = (p, name)
                elif child not in seen:
                    stack.append(child)
        for c in self._calls:
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
                        if self._actual.get(id(var)) in own:
                            edges.pop((id(node), i), None)
                    else:
                        stack.append(child)
        if edges:
            p, op = next(iter(edges.values()))
            others = sorted({self._name_of(q) for q, _ in edges.values()} - {self._name_of(p)})
            if not self._watching and self.functional is None:
                op += "; F.linear calls are watched only while earlier steps made one: pass functional=True"
            raise RuntimeError(
                f"parameter {self._name_of(p)!r} is used by an operation ({op}) outside the calls the engine "
                "captured (its module's forward, F.linear, nn.MultiheadAttention), so its per-sample gradient "
                "would be incomplete" + (f"; so are {others}" if others else "") + ". Use it through a module "
                "(e.g. tie an nn.Linear's weight to it, or call F.linear(x, weight)), or leave its modules out "
                "(modules=[...], bookkeeping=False), or pass unsupported='reference' for their module"
            )

    # -- norms ------------------------------------------------------------------------------------

    def norms(
        self, losses: torch.Tensor, *, microbatches: int | None = None, retain_graph: bool | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]`` float32: ``||grad_K l_i||^2`` for each sample (or ``[n]`` for ``microbatches=n``).

        With ``microbatches=n`` the batch is cut into ``n`` contiguous chunks (as
        ``torch.tensor_split``) and each chunk is one unit: its value is the squared norm of the
        gradient of its summed loss, ``||sum_{i in chunk} grad_K l_i||^2``.

        Packed rows: with ``documents`` (``[rows, positions]`` ids ``0 .. N-1`` of the documents
        each position belongs to, -1 for padding; each document one contiguous run in one row)
        ``losses`` are per-document ``[N]`` and each document is a unit: the norm of the sum of its
        positions' per-position gradient terms. That is the gradient of the document's own loss
        when documents do not see each other (block-diagonal attention, as packing requires).
        Supported for position-wise rules (Linear, Embedding, LayerNorm/RMSNorm, Conv1D, F.linear);
        convolutions and attention modules raise.

        Runs the backward of ``sum_i l_i`` through the graph of the captured forward; ``.grad``
        is not touched. The graph is kept when ``retain_graph`` is True, or by default when
        :meth:`weighted_backward` will need a second backward.
        """
        check_batch(losses, "losses")
        check_finite(losses, "losses")
        if not losses.requires_grad:
            raise ValueError("losses do not require grad: compute them with grad enabled inside capture()")
        if not self._calls and self._norm_params:
            raise RuntimeError("no forward pass was captured: run the model inside `with si.capture():`")
        b = losses.shape[0]
        if documents is not None:
            if microbatches is not None:
                raise ValueError("documents and microbatches cannot be combined: the units are either "
                                 "documents or micro-batches")
            check_documents(documents, b)
            documents = documents.to(losses.device)
        sizes = microbatch_sizes(b, microbatches) if microbatches is not None else None
        keep = bool(self._second) if retain_graph is None else retain_graph
        total = losses.new_zeros(len(sizes) if sizes else b, dtype=torch.float32)
        self._check_uses(losses)

        if self._fallback:
            for g in batched_autograd_grads(losses, self._fallback):
                g = g.float().flatten(1)
                if sizes:
                    g = torch.stack([c.sum(0) for c in g.split(sizes)])
                total += sq_norms(g)

        for c in self._calls:
            if c.activation is not None and c.activation._version != c.version:
                raise RuntimeError(
                    f"the input of {c.name!r} ({type(c.module).__name__}) was modified in place after its forward; "
                    "its per-sample gradient needs that input as it was: make the later operation out of place"
                )
        calls, self._calls = self._calls, []
        state = _Pass(b=b, sizes=sizes, total=total, room=self.max_kept_bytes, norm_params=set(self._norm_params),
                      documents=documents, target=document_index(documents, b) if documents is not None else None)
        for c in calls:
            for q in c.params.values():
                state.remaining[q] = state.remaining.get(q, 0) + 1
        # A layer's output gradient is turned into its factors (and, once a parameter's last use is in,
        # its norm) by a hook as soon as autograd computes it, and then freed: the backward is asked
        # only for the gradients of layers below which no other tracked layer lies (the others are on
        # its way, so their hooks fire) and of call-rule layers (several outputs, formed afterwards).
        below = _tracked_below({e.node for c in calls if not c.call_rule for e in c.edges if e is not None},
                               losses.grad_fn)
        inputs, direct = [], []
        for c in calls:
            if c.call_rule or (c.edges[0] is not None and not below.get(c.edges[0].node, False)):
                c.direct = True  # its gradient is returned by the backward rather than seen by its hook
                direct.append(c)
                inputs += [e for e in c.edges if e is not None]
        self._state = state
        try:
            grads = list(torch.autograd.grad(losses.float().sum(), inputs, allow_unused=True, retain_graph=keep)
                         if inputs else [])
        finally:
            self._state = None
            for c in calls:
                if c.hook is not None:
                    c.hook.remove()
        grads.reverse()
        for c in direct:
            self._consume(state, c, [grads.pop() if e is not None else None for e in c.edges])
        for c in calls:
            if not c.consumed:  # no gradient reached it
                self._consume(state, c, [None] * len(c.edges))
        kept, factors, total = state.kept, state.factors, state.total

        self._kept = kept
        self._factors = factors
        self._losses = losses
        self._graph_kept = keep
        return total.detach()

    def _apply_rule(self, c: _Call, gs: list, state: _Pass) -> dict[str, Factor]:
        b = state.b
        if state.documents is not None and (c.call_rule or not _positionwise(c)):
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
                x, g = _by_document(x, state), _by_document(g, state)
            elif x.shape[0] != b or g.shape[0] != b:
                raise ValueError(
                    f"module {c.name!r} saw a batch of {x.shape[0]} but losses has {b} samples: "
                    "the batch dimension must come first in every layer's input; a layer called without a "
                    "batch dimension and broadcast over it (a position embedding) goes in broadcast=[...]; "
                    "for several documents per row (packed rows) pass documents=[rows, positions] ids"
                )
            rule = _linear_rule if isinstance(c.module, types.SimpleNamespace) else rule_for(c.module)
            produced = rule(c.module, x if not x.is_floating_point() else x.float(), g.float())
        for f in produced.values():
            if f.units != b:
                raise ValueError(f"module {c.name!r} saw a batch of {f.units} but losses has {b} samples")
        return produced

    def _arrived(self, c: _Call, grad: torch.Tensor) -> None:
        """Gradient hook on a captured output: form its factors now (during the norms backward only)."""
        state = self._state
        if state is not None and not c.direct and not c.consumed:
            self._consume(state, c, [grad])

    def _consume(self, state: _Pass, c: _Call, gs: list) -> None:
        c.consumed = True
        produced: dict[str, Factor] = {}
        if any(g is not None for g in gs):
            produced = self._apply_rule(c, gs, state)
        c.activation, c.inputs = None, ()  # the factors hold what the update needs; the rest may go
        for pname, q in c.params.items():
            f = produced.get(pname)
            if f is not None:
                state.factors.setdefault(q, []).append(f)
            state.remaining[q] -= 1
            if state.remaining[q] == 0:
                self._finish_param(state, q)

    def _finish_param(self, state: _Pass, q: nn.Parameter) -> None:
        if q not in state.norm_params or q not in state.factors:
            return
        state.total += self._finish(q, state.factors, state.sizes, state.kept, state.room)
        if q in state.kept:
            state.room -= state.kept[q].numel() * state.kept[q].element_size()
            del state.factors[q]  # the kept per-sample gradient serves the update

    def _finish(self, p: nn.Parameter, factors: dict, sizes: list[int] | None, kept: dict, room: int) -> torch.Tensor:
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

    # -- the weighted update ----------------------------------------------------------------------

    def weighted_backward(self, weights: torch.Tensor) -> None:
        """Add ``sum_i w_i grad l_i`` to ``.grad`` of every trainable parameter (summed over ranks).

        Parameters with a rule get it from the activations and output gradients stored by the last
        :meth:`norms` call (no second backward); the rest by a backward of ``sum_i w_i l_i``
        restricted to them. ``weights`` are per sample ``[B]`` (detached here). Frees the stored state.
        Under ``torch.distributed`` plain gradients are all-reduced (one collective) and those of
        ``DTensor`` parameters (FSDP2) reduce-scattered into the parameter's placement.
        """
        if self._factors is None or self._losses is None:
            raise RuntimeError("call norms(losses) before weighted_backward(weights)")
        check_same_length(self._losses, "losses", weights, "weights")
        w = weights.detach().to(device=self._losses.device, dtype=torch.float32)
        distributed = D.is_distributed(self.group)
        updates: list[tuple[nn.Parameter, torch.Tensor | None]] = []
        for p in self._bookkept:
            fs = self._factors.get(p)
            if p in self._kept:
                per_sample = self._kept[p]
                updates.append((p, (w @ per_sample.reshape(w.shape[0], -1)).view(p.shape)))
            elif fs:
                g = fs[0].weighted(w)
                for f in fs[1:]:
                    g.add_(f.weighted(w))
                updates.append((p, g))
            elif distributed:  # used on other ranks only: every rank must contribute to the same collective
                updates.append((p, None))
        if self._second:
            used = list(self._second)
            if not self._graph_kept:
                raise RuntimeError(
                    "parameters without a rule need a second backward but the graph was freed: "
                    "call norms(..., retain_graph=True)"
                )
            if any(_is_dtensor(p) for p in used):
                bad = [self._name_of(p) for p in used if _is_dtensor(p)][:5]
                raise RuntimeError(
                    f"parameters {bad} have no per-sample rule and are sharded (FSDP2): their gradient would "
                    "need a second backward through the sharded model; give their modules a rule or leave "
                    "them out of fully_shard"
                )
            grads = torch.autograd.grad((w * self._losses.float()).sum(), used, allow_unused=True)
            updates += [(p, g) for p, g in zip(used, grads) if g is not None or distributed]
        if distributed:
            updates = self._reduce(updates)
        for p, g in updates:
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().to(p.dtype)  # a fresh tensor of ours: no copy
            else:
                p.grad.add_(g.to(p.dtype))
        self.clear()

    def _reduce(self, updates: list[tuple[nn.Parameter, torch.Tensor | None]]) -> list:
        """Sum the gradients over ranks: one all-reduce for plain parameters, one reduce-scatter per
        device mesh for ``DTensor`` parameters sharded on dim 0 (FSDP2), and a redistribution per
        parameter for any other placement."""
        plain = [(p, g) for p, g in updates if not _is_dtensor(p)]
        sharded = [(p, g) for p, g in updates if _is_dtensor(p) and not _dim0_sharded(p)]
        by_mesh: dict[int, list] = {}
        for p, g in updates:
            if _is_dtensor(p) and _dim0_sharded(p):
                by_mesh.setdefault(id(p.device_mesh), []).append((p, g))
        out = []
        if plain:
            ref = self._losses
            full = [g if g is not None else torch.zeros(p.shape, device=ref.device) for p, g in plain]
            flat = D.all_reduce_sum(torch.cat([g.reshape(-1).float() for g in full]), self.group)
            out += [(p, v.view(p.shape)) for (p, _), v in zip(plain, flat.split([g.numel() for g in full]))]
        for items in by_mesh.values():
            out += _reduce_scatter_dim0(items, self._losses.device)
        for p, g in sharded:
            out.append((p, _reduce_scatter_like(p, g, self._losses.device)))
        return out


def _dim0_sharded(p) -> bool:
    from torch.distributed.tensor import Shard

    return p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


def _reduce_scatter_dim0(items: list, device) -> list:
    """One reduce-scatter for parameters sharded on dim 0 of one 1-d mesh (``torch.chunk`` layout:
    rank ``r`` holds rows ``[r c, (r + 1) c)`` with ``c = ceil(rows / world)``, the last ranks fewer)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = items[0][0].device_mesh
    group, world = mesh.get_group(), mesh.size()
    local_device = items[0][0].to_local().device
    blocks, sizes = [], []
    for p, g in items:
        rows = p.shape[0]
        chunk = -(-rows // world)
        rest = p.numel() // max(rows, 1)
        full = torch.zeros(world * chunk * rest, device=local_device)
        if g is not None:
            full[: g.numel()] = g.reshape(-1).float().to(local_device)
        blocks.append(full.view(world, chunk * rest))
        sizes.append(chunk * rest)
    send = torch.cat(blocks, 1).reshape(-1)  # rank-major: every parameter's chunk r, for r = 0, 1, ...
    mine = torch.empty(sum(sizes), device=local_device)
    dist.reduce_scatter_tensor(mine, send, group=group)
    out = []
    for (p, _), part in zip(items, mine.split(sizes)):
        local_shape = p.to_local().shape
        local = part[: local_shape.numel()].view(local_shape).to(p.dtype)
        out.append((p, DTensor.from_local(local, device_mesh=mesh, placements=p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())))
    return out


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _reduce_scatter_like(p, g: torch.Tensor | None, device) -> torch.Tensor:
    """The global sum of every rank's full-size ``g`` as a ``DTensor`` laid out like ``p`` (Partial -> p's placements:
    a reduce-scatter for ``Shard``, an all-reduce for ``Replicate``)."""
    from torch.distributed.tensor import DTensor, Partial

    if g is None:
        g = torch.zeros(p.shape, device=device)
    mesh = p.device_mesh
    partial = DTensor.from_local(g.float().to(p.to_local().device), device_mesh=mesh,
                                 placements=[Partial()] * mesh.ndim, run_check=False, shape=p.shape,
                                 stride=p.stride())
    return partial.redistribute(mesh, p.placements)
