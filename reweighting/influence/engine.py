"""Exact per-sample squared gradient norms from one forward and one backward pass.

Usage (the contract: ``losses`` are **per-sample** losses ``[B]``, each depending on its own
sample only, batch dimension first everywhere; the run-time verification below checks it)::

    si = SelfInfluence(model)                 # or modules=[model.blocks[0], ...]
    with si.capture():
        losses = per_sample_loss(model, batch)  # [B], e.g. reweighting.sequence_loss(...)
    sq_norms = si.norms(losses)               # [B]: ||grad_K l_i||^2, no .grad touched
    si.weighted_backward(weights)             # .grad += sum_i w_i grad l_i (book-keeping)

``capture`` stores each tracked layer's input; ``norms`` runs one backward of ``sum_i l_i`` (the
sum, not the mean, so that the output gradient of sample ``i`` is exactly that of ``l_i``) with
respect to the layer *outputs* only, which skips every weight-gradient product of a normal
backward, and turns the inputs and output gradients into per-sample norms layer by layer
(the ghost form ``sum((A_i A_i^T) * (G_i G_i^T))`` or the materialised
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

Verification (on by default): on the first :meth:`SelfInfluence.norms` call, and again whenever the
trainable parameters, the module tree, the dtypes or the layout of the layers' inputs change (and
every ``verify_every`` calls if set), a few units' norms and update gradients are compared with
autograd's per-sample gradients of the same forward (:mod:`.verify`); a difference raises
:class:`~reweighting.influence.verify.VerificationError` naming the first parameter that differs.
Calls that do not verify read nothing back to the host.
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
from torch.overrides import TorchFunctionMode

from .. import distributed as D
from ..checks import check_batch, check_finite, check_same_length
from .documents import by_document, check_documents, document_slots
from .factors import Factor, OuterFactor, sq_norms, tied_sq_norms
from .graph import COMPILED, check_uses, detach_all, input_nodes, is_compiled, output_edges, tracked_below
from .layers import call_rule_for, rule_for
from .layers.embedding import embedding as _embedding_rule
from .layers.hf_conv1d import hf_conv1d as _hf_conv1d_rule
from .layers.layernorm import layer_norm as _layer_norm_rule
from .layers.linear import linear as _linear_rule
from .layers.rmsnorm_like import rms_norm_like as _rms_norm_like_rule
from .plan import UNSUPPORTED, batch_statistics, make_plan, signature
from .reference import batched_autograd_grads
from .sharded import is_dtensor, reduce_updates
from .verify import check_units, compare, reference_grads, unit_weights

__all__ = ["SelfInfluence", "microbatch_sizes"]

# Rules whose per-sample gradient is a sum over positions of per-position terms.
_POSITIONWISE = {_linear_rule, _embedding_rule, _hf_conv1d_rule, _layer_norm_rule, _rms_norm_like_rule}
if hasattr(nn, "RMSNorm"):
    from .layers.layernorm import rms_norm as _rms_norm_rule

    _POSITIONWISE.add(_rms_norm_rule)


def microbatch_sizes(batch: int, microbatches: int) -> list[int]:
    """Sizes of ``microbatches`` contiguous chunks of a batch (as ``torch.tensor_split``)."""
    if not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches must be between 1 and the batch size {batch}, got {microbatches}")
    base, extra = divmod(batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)


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
    layout: tuple = ()  # the input's shape in symbols (see _symbols) and dtype: what verification keys on


@dataclass
class _Pass:
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


def _positionwise(c: _Call) -> bool:
    """Rules whose per-sample gradient is a sum of per-position terms (so positions can be regrouped)."""
    if isinstance(c.module, types.SimpleNamespace):
        return True
    return rule_for(c.module) in _POSITIONWISE


def _symbols(shape, b: int | None) -> tuple:
    """A shape up to its sizes: which dims equal the batch size or 1 (a dim that starts or stops
    matching the batch size changes the layout, and so triggers a new verification)."""
    return tuple("B" if d == b else "1" if d == 1 else "*" for d in shape)


def _batch_hint(shape: tuple, b: int) -> str:
    """Why a layer's input does not start with the batch of ``b`` samples, as far as its shape tells."""
    if len(shape) >= 2 and shape[1] == b:
        return ("its input holds the batch in dim 1 (a sequence-first layout, e.g. batch_first=False): run the "
                "layer batch-first ([B, T, ...])")
    if shape and shape[0] > b and shape[0] % b == 0:
        return (f"its input looks flattened ({shape[0]} rows = {b} samples x {shape[0] // b}): keep the batch "
                "dimension through the layer ([B, T, ...] rather than [B*T, ...])")
    if shape and shape[0] < b and len(shape) >= 2:
        return ("if each row holds several documents (packed rows), pass documents=[rows, positions] ids; if the "
                "layer runs once for the whole batch and is broadcast over it (a position embedding), put it in "
                "broadcast=[...]")
    return ("if the layer runs without a batch dimension and is broadcast over the batch (a position embedding), "
            "put it in broadcast=[...]")


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

    - ``modules``: modules or their qualified names in ``model``. Which of their parameters are
      trainable is read at each :meth:`capture` (a layer frozen or unfrozen later counts as it is).
    - ``bookkeeping``: also track every other supported layer, so that :meth:`weighted_backward`
      covers all parameters without a second backward (set False when only norms are wanted:
      the backward then stops at the earliest chosen layer).
    - ``broadcast``: modules called without a batch dimension (``[T]``) or with one of size 1
      (``[1, T]``) whose output is broadcast over the batch (a position embedding). During capture
      their output is expanded to ``[B, ...]`` (a view, no copy) so that each sample's output
      gradient is kept; a call on a batched input ``[B, ...]`` is taken as an ordinary call.
    - ``reference``: modules whose parameters' per-sample gradients are taken from autograd
      (exact for any use, materialised, slower): e.g. a small table used in a shape no rule reads,
      such as T5's ``relative_attention_bias``.
    - ``unsupported``: ``"raise"`` (default) for a chosen module with parameters but no rule;
      ``"reference"`` treats every such module as if it were in ``reference``.
    - ``max_kept_bytes``: per-sample gradients that were materialised for the norms are kept, up
      to this many bytes, and reused by :meth:`weighted_backward`; 0 keeps none.
    - ``functional``: capture ``F.linear`` calls on tracked weights outside their modules (a
      ``TorchFunctionMode`` over the forward). ``None`` (default) watches the first capture and keeps
      watching only if such a use was seen; ``True`` always; ``False`` never. A use nothing captured
      always raises in :meth:`norms`.
    - ``verify``: check the norms and the update of ``verify_units`` units against autograd on the
      first call and whenever the parameters, modules or input layout change (module docstring);
      ``verify_every=N`` also checks every ``N``-th call; ``verify_tol`` overrides the relative
      tolerance (default by dtype: 1e-3 for float32, 5e-2 for 16-bit, 1e-4 for float64).

    Layers that normalise with batch statistics are refused; so are compiled models.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[nn.Module | str] | None = None,
        *,
        bookkeeping: bool = True,
        broadcast: Iterable[nn.Module | str] = (),
        reference: Iterable[nn.Module | str] = (),
        unsupported: str = "raise",
        max_kept_bytes: int = 2**30,
        functional: bool | None = None,
        verify: bool = True,
        verify_every: int | None = None,
        verify_units: int = 2,
        verify_tol: float | None = None,
        group=None,
    ):
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
        if verify_every is not None and int(verify_every) < 1:
            raise ValueError(f"verify_every must be a positive number of calls or None, got {verify_every}")
        if int(verify_units) < 1:
            raise ValueError(f"verify_units must be at least 1, got {verify_units}")
        compiled = [n or "<model>" for n, m in model.named_modules() if is_compiled(m)]
        if compiled:
            raise ValueError(f"model: module(s) {compiled[:5]} are compiled; {COMPILED}")
        self.model = model
        self.group = group
        self._spec = dict(modules=None if modules is None else list(modules), broadcast=list(broadcast),
                          reference=list(reference), bookkeeping=bookkeeping, unsupported=unsupported)
        self._plan_signature = None
        self._replan()
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
        self.verify, self.verify_every, self.verify_units = bool(verify), verify_every, int(verify_units)
        self.verify_tol = verify_tol
        self._verified_layout = None
        self._since_verified = 0
        self.verifications = 0  # how many calls were verified (for tests and benchmarks)

    def _replan(self) -> None:
        """Plan for the model as it is now (trainable parameters, modules); see :mod:`.plan`."""
        names = {m: n for n, m in self.model.named_modules(remove_duplicate=False)}
        batch_statistics(self.model, names)
        plan = make_plan(self.model, names=names, **self._spec)
        self._names = names
        self._param_names = {p: n for n, p in self.model.named_parameters()}
        self._chosen, self._fallback, self._norm_params = plan.chosen, plan.fallback, plan.norm_params
        self._tracked, self._bookkept, self._second = plan.tracked, plan.bookkept, plan.second
        self._module_params, self._broadcast = plan.module_params, plan.broadcast
        self._watched = set(self._norm_params) | set(self._bookkept)
        self._actual: dict[int, nn.Parameter] = {id(p): p for p in self._watched}
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._watched) else torch.float32
        self._unbatched_rank: dict[nn.Module, int] = {}
        self._plan_signature = signature(self.model)

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
        if signature(self.model) != self._plan_signature:
            self._replan()
        else:
            batch_statistics(self.model, self._names)  # a layer may have been put in training mode
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
            inputs = detach_all(args)
            self._calls.append(_Call(
                self._names[module], module, params, *output_edges(outs),
                stops=input_nodes(args) | input_nodes(kwargs.values()), activation=inputs[0],
                version=inputs[0]._version, inputs=inputs, kwargs=dict(kwargs), call_rule=True,
                layout=(_symbols(args[0].shape, self._batch_size), args[0].dtype)))
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
        layout = (_symbols(activation.shape, self._batch_size), activation.dtype)
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
            layout = (_symbols(activation.shape, self._batch_size), activation.dtype)
        self._record(_Call(self._names[module], module, params, *output_edges([output]),
                           stops=input_nodes(args) | input_nodes(kwargs.values()), activation=activation,
                           version=raw._version, layout=layout), output)
        return output if expanded else None

    def _broadcast_form(self, module: nn.Module, x: torch.Tensor) -> str:
        """How a ``broadcast`` module was called: ``"unbatched"`` (``[T]`` or ``[1, ...]``, to expand)
        or ``"batched"`` (``[B, ...]``, an ordinary call); anything else raises."""
        name = self._names[module]
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
        self._record(_Call(f"F.linear(..., {self._name_of(p)})", owner, params, *output_edges([out]),
                           stops=input_nodes([x]), activation=x.detach(), version=x._version,
                           layout=(_symbols(x.shape, self._batch_size), x.dtype)), out)

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

    # -- norms ------------------------------------------------------------------------------------

    def norms(
        self, losses: torch.Tensor, *, microbatches: int | None = None, retain_graph: bool | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]``: ``||grad_K l_i||^2`` for each sample (or ``[n]`` for ``microbatches=n``), float32
        (float64 for a float64 model).

        With ``microbatches=n`` the batch is cut into ``n`` contiguous chunks (as
        ``torch.tensor_split``) and each chunk is one unit: its value is the squared norm of the
        gradient of its summed loss, ``||sum_{i in chunk} grad_K l_i||^2``.

        Packed rows: with ``documents`` (``[rows, positions]`` ids ``0 .. N-1`` of the documents
        each position belongs to, -1 for padding; each document one contiguous run in one row)
        ``losses`` are per-document ``[N]`` and each document is a unit: the norm of the sum of its
        positions' per-position gradient terms. That is the gradient of the document's own loss
        when documents do not see each other (block-diagonal attention, as packing requires); the
        verification compares it with autograd's gradient of each document's loss, so documents
        that attend to each other raise rather than give a wrong norm. Supported for position-wise
        rules (Linear, Embedding, LayerNorm/RMSNorm, Conv1D, F.linear); convolutions and attention
        modules raise.

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
        dtype = self._dtype
        total = losses.new_zeros(len(sizes) if sizes else b, dtype=dtype)
        check_uses(losses, self._actual if self._watched else {}, self._calls, self._name_of, self._use_hint())
        for c in self._calls:
            if c.activation is not None and c.activation._version != c.version:
                raise RuntimeError(
                    f"the input of {c.name!r} ({type(c.module).__name__}) was modified in place after its forward; "
                    "its per-sample gradient needs that input as it was: make the later operation out of place"
                )
        check = self._verification(losses, documents, sizes)

        if self._fallback:
            for g in batched_autograd_grads(losses, self._fallback):
                g = g.to(dtype).flatten(1)
                if sizes:
                    g = torch.stack([c.sum(0) for c in g.split(sizes)])
                total += sq_norms(g)

        calls, self._calls = self._calls, []
        state = _Pass(b=b, sizes=sizes, total=total, room=self.max_kept_bytes, norm_params=set(self._norm_params),
                      dtype=dtype, documents=documents,
                      slots=document_slots(documents, b) if documents is not None else None,
                      per_param={} if check is not None else None)
        for c in calls:
            for q in c.params.values():
                state.remaining[q] = state.remaining.get(q, 0) + 1
        # A layer's output gradient is turned into its factors (and, once a parameter's last use is in,
        # its norm) by a hook as soon as autograd computes it, and then freed: the backward is asked
        # only for the gradients of layers below which no other tracked layer lies (the others are on
        # its way, so their hooks fire) and of call-rule layers (several outputs, formed afterwards).
        below = tracked_below({e.node for c in calls if not c.call_rule for e in c.edges if e is not None},
                              losses.grad_fn)
        inputs, direct = [], []
        for c in calls:
            if c.call_rule or (c.edges[0] is not None and not below.get(c.edges[0].node, False)):
                c.direct = True  # its gradient is returned by the backward rather than seen by its hook
                direct.append(c)
                inputs += [e for e in c.edges if e is not None]
        self._state = state
        try:
            grads = list(torch.autograd.grad(losses.to(dtype).sum(), inputs, allow_unused=True, retain_graph=keep)
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
        if check is not None:
            self._compare(check, state, documents)
        self._kept = state.kept
        self._factors = state.factors
        self._losses = losses
        self._graph_kept = keep
        return state.total.detach()

    def _use_hint(self) -> str:
        if not self._watching and self.functional is None:
            return (". If it is an F.linear call: F.linear calls are watched only while earlier steps made one, pass "
                    "functional=True; if it is a module called outside `with si.capture():`, run it inside")
        return ". If it is a module called outside `with si.capture():`, run it inside"

    # -- verification -----------------------------------------------------------------------------

    def _layout(self, losses: torch.Tensor, documents: torch.Tensor | None, sizes: list[int] | None) -> tuple:
        """What the rules' correctness depends on, from host-side facts only (no device read)."""
        return (self._plan_signature, tuple(m.training for m in self._names), losses.shape[0], losses.dtype,
                None if documents is None else _symbols(documents.shape, losses.shape[0]),
                None if sizes is None else len(sizes),
                tuple((c.name, c.layout) for c in self._calls))

    def _verification(self, losses: torch.Tensor, documents, sizes) -> tuple | None:
        """Autograd's reference gradients for a few units when this call is to be verified, else None."""
        if not self.verify or any(is_dtensor(p) for p in self._watched):
            return None  # sharded parameters: a backward per unit would need every rank (not checked)
        layout = self._layout(losses, documents, sizes)
        self._since_verified += 1
        due = self.verify_every is not None and self._since_verified >= self.verify_every
        if layout == self._verified_layout and not due:
            return None
        params = [p for p in self._param_names if p in self._watched]
        if not params:
            return None
        units = check_units(len(sizes) if sizes else losses.shape[0], self.verify_units)
        weights = unit_weights(units, losses.shape[0], sizes, losses.device)
        reference = reference_grads(losses, params, weights)
        self._since_verified = 0
        self.verifications += 1
        return layout, params, units, weights, reference

    def _compare(self, check: tuple, state: _Pass, documents) -> None:
        layout, params, units, weights, reference = check
        grads = {}
        for p in params:
            fs = state.factors.get(p)
            if p in state.kept:
                grads[p] = [(w.to(state.dtype) @ state.kept[p].reshape(w.shape[0], -1)).view(p.shape) for w in weights]
            elif fs:
                grads[p] = [sum(f.weighted(w.to(state.dtype)) for f in fs) for w in weights]
        hint = ("samples that interact (batch statistics, a loss or an operation over the batch such as "
                "x - x.mean(0)), a layer whose first dimension is not the batch (sequence-first, flattened, or a "
                "table broadcast over the batch that belongs in broadcast=[...] or reference=[...]), or a layer "
                "that a rule does not describe")
        if documents is not None:
            hint = ("the documents of a packed row see each other (attention across document boundaries: give "
                    "each document its own position ids starting at 0 and a block-diagonal mask, e.g. "
                    "flash-attention varlen or position_ids-based packing), or " + hint)
        compare(params, [self._name_of(p) for p in params], units, reference, state.per_param, grads,
                self.verify_tol, hint)
        self._verified_layout = layout

    # -- from output gradients to factors ---------------------------------------------------------

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
                x, g = (by_document(t, state.slots, b, rows[1]) for t in (x, g))
            elif x.shape[0] != b or g.shape[0] != b:
                raise ValueError(
                    f"module {c.name!r} ({type(c.module).__name__}) saw an input of shape {tuple(x.shape)} but "
                    f"losses has {b} samples, and the batch dimension must come first in every layer's input: "
                    + _batch_hint(tuple(x.shape), b)
                )
            rule = _linear_rule if isinstance(c.module, types.SimpleNamespace) else rule_for(c.module)
            produced = rule(c.module, x if not x.is_floating_point() else x.to(state.dtype), g.to(state.dtype))
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
        norms = self._finish(q, state.factors, state.sizes, state.kept, state.room)
        state.total += norms
        if state.per_param is not None:
            state.per_param[q] = norms
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
        restricted to them. ``weights`` are per sample ``[B]``, finite (detached here). Frees the
        stored state. Under ``torch.distributed`` plain gradients are all-reduced (one collective)
        and those of ``DTensor`` parameters (FSDP2) reduce-scattered into the parameter's placement.
        """
        if self._factors is None or self._losses is None:
            raise RuntimeError("call norms(losses) before weighted_backward(weights)")
        check_same_length(self._losses, "losses", weights, "weights")
        check_finite(weights, "weights")
        w = weights.detach().to(device=self._losses.device, dtype=self._dtype)
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
            if any(is_dtensor(p) for p in used):
                bad = [self._name_of(p) for p in used if is_dtensor(p)][:5]
                raise RuntimeError(
                    f"parameters {bad} have no per-sample rule and are sharded (FSDP2): their gradient would "
                    "need a second backward through the sharded model; give their modules a rule or leave "
                    "them out of fully_shard"
                )
            grads = torch.autograd.grad((w * self._losses.to(w.dtype)).sum(), used, allow_unused=True)
            updates += [(p, g) for p, g in zip(used, grads) if g is not None or distributed]
        if distributed:
            updates = reduce_updates(updates, self._losses.device, self.group)
        for p, g in updates:
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().to(p.dtype)  # a fresh tensor of ours: no copy
            else:
                p.grad.add_(g.to(p.dtype))
        self.clear()
