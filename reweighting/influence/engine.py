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
uses' per-sample gradients summed before the norm, so the cross terms are exact.

``weighted_backward`` forms ``sum_i w_i A_i^T G_i`` (and the bias, embedding and LayerNorm
analogues) from the same stored tensors and adds it to ``.grad`` without a second backward pass.
Parameters that no rule covers (of modules without a rule, or used by one) are updated by a
second backward of ``sum_i w_i l_i`` restricted to them; :meth:`norms` then keeps the graph.

Under ``torch.distributed`` the gradients written by :meth:`weighted_backward` are summed over
ranks (with weights normalised over the global batch this is the global ``sum_i w_i grad l_i``).
With DDP, run the forward under ``ddp_model.no_sync()`` (or capture the inner module) so that
DDP does not expect a backward of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import distributed as D
from ..checks import check_batch, check_finite, check_same_length
from .factors import Factor, OuterFactor, sq_norms, tied_sq_norms
from .layers import COVERED, RULES, mixes_samples, refusal, rule_for
from .reference import batched_autograd_grads

__all__ = ["SelfInfluence", "microbatch_sizes"]

UNSUPPORTED = ("raise", "reference")


def microbatch_sizes(batch: int, microbatches: int) -> list[int]:
    """Sizes of ``microbatches`` contiguous chunks of a batch (as ``torch.tensor_split``)."""
    if not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches must be between 1 and the batch size {batch}, got {microbatches}")
    base, extra = divmod(batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)


def _own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


@dataclass
class _Call:
    name: str
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor
    version: int


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

    Layers that mix samples (BatchNorm in training mode) are refused when capturing.
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
        group=None,
    ):
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
        self.model = model
        self.group = group
        names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        chosen = self._resolve(model, modules, names)
        self._broadcast = set(self._resolve(model, broadcast, names, allow_empty=True))

        owners: dict[nn.Parameter, list[nn.Module]] = {}
        for m in names:
            for p in _own_trainable(m).values():
                if m not in owners.setdefault(p, []):
                    owners[p].append(m)

        def ruled(m: nn.Module) -> bool:
            return rule_for(m) is not None and refusal(m) is None and set(_own_trainable(m)) <= COVERED

        for m in chosen:
            reason = refusal(m) if rule_for(m) is not None else None
            if reason is not None:
                raise ValueError(f"module {names[m] or '<model>'!r} ({type(m).__name__}) is refused: {reason}")
        chosen_params = [p for m in chosen for p in _own_trainable(m).values()]
        self._chosen = list(dict.fromkeys(chosen_params))
        self._fallback = [p for p in self._chosen if not all(ruled(m) for m in owners[p])]
        if self._fallback and unsupported == "raise":
            bad = [m for p in self._fallback for m in owners[p] if not ruled(m)]
            listed = ", ".join(f"{names[m] or '<model>'!r} ({type(m).__name__})" for m in dict.fromkeys(bad))
            known = ", ".join(sorted(t.__name__ for t in RULES))
            raise ValueError(
                f"no per-sample gradient rule for module(s) {listed} with trainable parameters; supported "
                f"layers: {known}. Choose other modules, or pass unsupported='reference' to take their "
                "per-sample gradients from autograd (exact but slower)"
            )
        fallback_ids = set(self._fallback)
        needed = {p for p in self._chosen if p not in fallback_ids}
        tracked = {m for p in needed for m in owners[p]}
        if bookkeeping:
            tracked |= {m for ms in owners.values() for m in ms if ruled(m)}
        self._tracked = [m for m in names if m in tracked]
        self._names = names
        self._norm_params = [p for p in self._chosen if p not in fallback_ids]
        # Parameters the book-keeping update covers: every use is by a tracked layer with a rule.
        self._bookkept = [p for p, ms in owners.items() if all(m in tracked and ruled(m) for m in ms)]
        bookkept = set(self._bookkept)
        self._second = [p for p in owners if p not in bookkept]
        self._calls: list[_Call] = []
        self._factors: dict[nn.Parameter, list[Factor]] | None = None
        self._kept: dict[nn.Parameter, torch.Tensor] = {}
        self.max_kept_bytes = int(max_kept_bytes)
        self._losses: torch.Tensor | None = None
        self._graph_kept = False
        self._batch_size: int | None = None

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
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in dict.fromkeys(self._tracked)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        activation = (args[0] if args else next(iter(kwargs.values()))).detach()
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
        self._calls.append(_Call(self._names[module], module, activation, output, output._version))
        return output if module in self._broadcast else None

    def clear(self) -> None:
        """Drop the stored activations, output gradients and graph references."""
        self._calls = []
        self._factors = None
        self._kept = {}
        self._losses = None
        self._graph_kept = False

    # -- norms ------------------------------------------------------------------------------------

    def norms(
        self, losses: torch.Tensor, *, microbatches: int | None = None, retain_graph: bool | None = None
    ) -> torch.Tensor:
        """``[B]`` float32: ``||grad_K l_i||^2`` for each sample (or ``[n]`` for ``microbatches=n``).

        With ``microbatches=n`` the batch is cut into ``n`` contiguous chunks (as
        ``torch.tensor_split``) and each chunk is one unit: its value is the squared norm of the
        gradient of its summed loss, ``||sum_{i in chunk} grad_K l_i||^2``.

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
        sizes = microbatch_sizes(b, microbatches) if microbatches is not None else None
        keep = bool(self._second) if retain_graph is None else retain_graph
        total = losses.new_zeros(len(sizes) if sizes else b, dtype=torch.float32)

        if self._fallback:
            for g in batched_autograd_grads(losses, self._fallback):
                g = g.float().flatten(1)
                if sizes:
                    g = torch.stack([c.sum(0) for c in g.split(sizes)])
                total += sq_norms(g)

        for c in self._calls:
            if c.output._version != c.version:
                raise RuntimeError(
                    f"the output of module {c.name!r} ({type(c.module).__name__}) was modified in place after "
                    "its forward (e.g. by ReLU(inplace=True)); its output gradient cannot be recovered: "
                    "make that operation out of place"
                )
        grads = torch.autograd.grad(losses.float().sum(), [c.output for c in self._calls],
                                    allow_unused=True, retain_graph=keep) if self._calls else []
        factors: dict[nn.Parameter, list[Factor]] = {}
        for c, g in zip(self._calls, grads):
            if g is None:
                continue
            if c.activation.shape[0] != b or g.shape[0] != b:
                raise ValueError(
                    f"module {c.name!r} saw a batch of {c.activation.shape[0]} but losses has {b} samples: "
                    "the batch dimension must come first in every layer's input; a layer called without a "
                    "batch dimension and broadcast over it (a position embedding) goes in broadcast=[...]"
                )
            params = _own_trainable(c.module)
            for pname, f in rule_for(c.module)(c.module, c.activation.float(), g.detach().float()).items():
                if pname in params:
                    factors.setdefault(params[pname], []).append(f)

        kept: dict[nn.Parameter, torch.Tensor] = {}
        room = self.max_kept_bytes
        for p in self._norm_params:
            fs = factors.get(p, [])
            if sizes:
                fs = [f.grouped(sizes) for f in fs]
            if not fs:
                continue
            if len(fs) == 1 and not (isinstance(fs[0], OuterFactor) and not fs[0].ghost_is_cheaper()):
                total += fs[0].sq_norms()
                continue
            tied = tied_sq_norms(fs)
            if tied is not None:
                total += tied
                continue
            # Materialised (cheaper than the ghost form, or a shared parameter whose uses must be summed
            # before the norm). Per-sample gradients are kept, within the memory allowance, because the
            # weighted update is then a cheap weighted sum of them rather than a product over positions.
            per_unit = sum(f.per_unit() for f in fs)
            total += sq_norms(per_unit)
            size = per_unit.numel() * per_unit.element_size()
            if not sizes and size <= room:
                kept[p] = per_unit
                room -= size

        self._kept = kept
        self._factors = factors
        self._losses = losses
        self._graph_kept = keep
        self._calls = []  # the outputs (and through them the graph) are no longer needed here
        return total.detach()

    # -- the weighted update ----------------------------------------------------------------------

    def weighted_backward(self, weights: torch.Tensor) -> None:
        """Add ``sum_i w_i grad l_i`` to ``.grad`` of every trainable parameter (summed over ranks).

        Parameters with a rule get it from the activations and output gradients stored by the last
        :meth:`norms` call (no second backward); the rest by a backward of ``sum_i w_i l_i``
        restricted to them. ``weights`` are per sample ``[B]`` (detached here). Frees the stored state.
        """
        if self._factors is None or self._losses is None:
            raise RuntimeError("call norms(losses) before weighted_backward(weights)")
        check_same_length(self._losses, "losses", weights, "weights")
        w = weights.detach().to(device=self._losses.device, dtype=torch.float32)
        updates: list[tuple[nn.Parameter, torch.Tensor]] = []
        for p in self._bookkept:
            fs = self._factors.get(p)
            if p in self._kept:
                per_sample = self._kept[p]
                updates.append((p, (w @ per_sample.reshape(w.shape[0], -1)).view(p.shape)))
            elif fs:
                updates.append((p, sum(f.weighted(w) for f in fs)))
        if self._second:
            used = list(self._second)
            if not self._graph_kept:
                raise RuntimeError(
                    "parameters without a rule need a second backward but the graph was freed: "
                    "call norms(..., retain_graph=True)"
                )
            grads = torch.autograd.grad((w * self._losses.float()).sum(), used, allow_unused=True)
            updates += [(p, g) for p, g in zip(used, grads) if g is not None]
        if D.is_distributed(self.group) and updates:
            flat = D.all_reduce_sum(torch.cat([g.reshape(-1).float() for _, g in updates]), self.group)
            updates = [(p, v.view_as(g)) for (p, g), v in zip(updates, flat.split([g.numel() for _, g in updates]))]
        for p, g in updates:
            g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
        self.clear()
