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
import types
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .. import distributed as D
from ..checks import check_batch, check_finite, check_same_length
from .documents import check_documents, document_slots
from .factors import Factor, sq_norms
from .graph import COMPILED, FunctionalUses, check_uses, is_compiled, tracked_below
from .passes import Call, Pass, consume, symbols
from .plan import UNSUPPORTED, batch_statistics, make_plan, signature
from .recording import CallRecorder
from .reference import batched_autograd_grads
from .sharded import is_dtensor, reduce_updates
from .verify import DOCUMENTS_HINT, HINT, check_units, compare, reference_grads, unit_weights

__all__ = ["SelfInfluence", "microbatch_sizes"]

def microbatch_sizes(batch: int, microbatches: int) -> list[int]:
    """Sizes of ``microbatches`` contiguous chunks of a batch (as ``torch.tensor_split``)."""
    if not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches must be between 1 and the batch size {batch}, got {microbatches}")
    base, extra = divmod(batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)


class SelfInfluence(CallRecorder):
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
        self._calls: list[Call] = []
        self._running: list[nn.Module] = []
        self._first_use_checked: set[nn.Module] = set()
        self._factors: dict[nn.Parameter, list[Factor]] | None = None
        self._kept: dict[nn.Parameter, torch.Tensor] = {}
        self.max_kept_bytes = int(max_kept_bytes)
        self._losses: torch.Tensor | None = None
        self._graph_kept = False
        self._batch_size: int | None = None
        self._input_batch: int | None = None
        self._state: Pass | None = None
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

        ``batch_size`` is needed only when a ``broadcast`` module runs before any tracked layer and
        the model's first input of two or more dimensions does not start with the batch; otherwise
        it is read from the first tracked layer's input (or, for such a broadcast module, the model's).
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
        self._input_batch = None
        handles = [self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)]
        for m in dict.fromkeys(self._tracked):
            handles.append(m.register_forward_pre_hook(self._pre_hook))
            handles.append(m.register_forward_hook(self._hook, with_kwargs=True, always_call=True))
        watch = self.functional is True or (self.functional is None and self._functional_seen is not False)
        self._watching = watch
        try:
            with FunctionalUses(self._functional_linear) if watch else contextlib.nullcontext():
                yield self
            if self.functional is None and watch:
                # Keep watching only where a functional use was seen (the check in norms() still
                # raises on a use that a later step makes and nothing captured).
                self._functional_seen = any(isinstance(c.module, types.SimpleNamespace) for c in self._calls)
        finally:
            for h in handles:
                h.remove()
            self._running = []

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
        state = Pass(b=b, sizes=sizes, total=total, room=self.max_kept_bytes, norm_params=set(self._norm_params),
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
            consume(state, c, [grads.pop() if e is not None else None for e in c.edges])
        for c in calls:
            if not c.consumed:  # no gradient reached it
                consume(state, c, [None] * len(c.edges))
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
                None if documents is None else symbols(documents.shape, losses.shape[0]),
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

    def _compare(self, check: tuple, state: Pass, documents) -> None:
        layout, params, units, weights, reference = check
        grads = {}
        for p in params:
            fs = state.factors.get(p)
            if p in state.kept:
                grads[p] = [(w.to(state.dtype) @ state.kept[p].reshape(w.shape[0], -1)).view(p.shape) for w in weights]
            elif fs:
                grads[p] = [sum(f.weighted(w.to(state.dtype)) for f in fs) for w in weights]
        hint = DOCUMENTS_HINT + HINT if documents is not None else HINT
        compare(params, [self._name_of(p) for p in params], units, reference, state.per_param, grads,
                self.verify_tol, hint)
        self._verified_layout = layout

    def _arrived(self, c: Call, grad: torch.Tensor) -> None:
        """Gradient hook on a captured output: form its factors now (during the norms backward only)."""
        state = self._state
        if state is not None and not c.direct and not c.consumed:
            consume(state, c, [grad])

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
