"""Per-sample gradients of one parameter use, kept in factored form.

A layer's per-sample gradient is a sum over the sample's positions ``t`` (tokens, pixels) of a
simple per-position term built from the stored input activation and output gradient. Three forms
cover every supported layer (docs/methods/presence.md):

- :class:`OuterFactor`: ``g_u = sum_t G_ut^T X_ut`` (weights of Linear and Conv, per group ``h``);
- :class:`SumFactor`: ``g_u = sum_t V_ut`` (biases, LayerNorm's ``sum_t G_ut * xhat_ut``);
- :class:`RowsFactor`: ``g_u = sum_t onehot(idx_ut) G_ut^T`` (Embedding);
- :class:`StackedFactor`: blocks of rows of one parameter, each one of the above (attention's
  packed ``[W_q; W_k; W_v]`` applied to different inputs).

Each gives the squared norms ``||g_u||^2`` for every unit ``u`` (a sample, or a micro-batch once
:meth:`grouped`), the materialised ``g_u`` (needed when a parameter is shared between modules, so
that the cross terms of the sum of its uses are exact), and the weighted batch gradient
``sum_u w_u g_u`` used for the book-keeping update. Everything is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OuterFactor", "SumFactor", "RowsFactor", "StackedFactor", "Factor", "group_rows", "sq_norms",
           "tied_sq_norms"]


def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """``[U]``: the squared Euclidean norm of each ``t[u]`` (one fused pass, no squared copy)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def group_rows(t: torch.Tensor, sizes: list[int], fill: float | int = 0) -> torch.Tensor:
    """``[B, T, ...]`` to ``[n, max(sizes) * T, ...]``: the rows of each group laid end to end.

    A group's positions are the union of its samples' positions, so a factor over groups gives
    the gradient of the group's summed loss. Short groups are padded with ``fill`` (a zero output
    gradient, or index -1), which contributes nothing.
    """
    n, longest = len(sizes), max(sizes)
    if all(s == longest for s in sizes):
        return t.reshape(n, longest * t.shape[1], *t.shape[2:])
    out = t.new_full((n, longest, *t.shape[1:]), fill)
    for k, chunk in enumerate(t.split(sizes)):
        out[k, : chunk.shape[0]] = chunk
    return out.reshape(n, longest * t.shape[1], *t.shape[2:])


@dataclass
class OuterFactor:
    """``g_u = sum_t G_ut^T X_ut`` per group ``h``: ``x`` is ``[U, T, H, a]``, ``g`` is ``[U, T, H, b]``.

    The parameter is the ``[H, b, a]`` array reshaped to ``shape``. The squared norm is taken in
    the ghost form ``sum((X_h X_h^T) * (G_h G_h^T))`` (cost ``T^2 (a + b)`` per unit) when that is
    cheaper than materialising ``G_h^T X_h`` (cost ``T a b``), and by materialising otherwise.
    """

    x: torch.Tensor
    g: torch.Tensor
    shape: torch.Size

    @property
    def units(self) -> int:
        return self.x.shape[0]

    def ghost_is_cheaper(self) -> bool:
        _, t, _, a = self.x.shape
        b = self.g.shape[-1]
        return t * (a + b) < a * b

    def sq_norms(self) -> torch.Tensor:
        if self.ghost_is_cheaper():
            x = self.x.transpose(1, 2)  # [U, H, T, a]
            g = self.g.transpose(1, 2)
            if self.x.shape[1] == 1:  # one position: ||g x^T||^2 = ||x||^2 ||g||^2
                return (x.square().sum(-1) * g.square().sum(-1)).sum((1, 2))
            xx = x @ x.transpose(-1, -2)
            gg = g @ g.transpose(-1, -2)
            return torch.einsum("uhij,uhij->u", xx, gg)
        return sq_norms(self.per_unit())

    def per_unit(self) -> torch.Tensor:
        u, t, h, a = self.x.shape
        b = self.g.shape[-1]
        if h == 1:  # the common case: one batched product of views, no copies
            return torch.bmm(self.g.reshape(u, t, b).transpose(1, 2), self.x.reshape(u, t, a)).reshape(u, *self.shape)
        return torch.einsum("uthb,utha->uhba", self.g, self.x).reshape(u, *self.shape)

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        u, t, h, a = self.x.shape
        b = self.g.shape[-1]
        g = self.g * w.view(-1, 1, 1, 1)
        if h == 1:
            return (g.reshape(u * t, b).t() @ self.x.reshape(u * t, a)).reshape(self.shape)
        return torch.einsum("uthb,utha->hba", g, self.x).reshape(self.shape)

    def grouped(self, sizes: list[int]) -> OuterFactor:
        return OuterFactor(group_rows(self.x, sizes), group_rows(self.g, sizes), self.shape)


class SumFactor:
    """``g_u = sum_t V_ut``: built from ``v`` ``[U, T, P]`` (the parameter has ``P`` elements in ``shape``).

    Only the per-unit sums ``[U, P]`` are kept (formed at once), so a bias or a norm weight holds no
    reference to its layer's output gradient.
    """

    def __init__(self, v: torch.Tensor, shape: torch.Size, *, summed: bool = False):
        self.s = v if summed else v.sum(1)
        self.shape = torch.Size(shape)

    @property
    def units(self) -> int:
        return self.s.shape[0]

    def sq_norms(self) -> torch.Tensor:
        return sq_norms(self.s)

    def per_unit(self) -> torch.Tensor:
        return self.s.reshape(self.units, *self.shape)

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        return (w @ self.s).reshape(self.shape)

    def grouped(self, sizes: list[int]) -> SumFactor:
        return SumFactor(torch.stack([c.sum(0) for c in self.s.split(sizes)]), self.shape, summed=True)


@dataclass
class RowsFactor:
    """``g_u = sum_t onehot(idx_ut) G_ut^T``: ``idx`` is ``[U, T]`` (-1: no gradient), ``g`` is ``[U, T, d]``.

    The squared norm ``sum_{t,s} [idx_t == idx_s] <G_t, G_s>`` is computed exactly in
    ``O(T log T + T d)`` rather than ``O(T^2 d)``: the output gradients are summed per distinct
    (unit, row) pair first. Every shape is fixed by the input shapes (sort and cumulative sum
    rather than ``unique`` or boolean indexing), so nothing here waits for the device.
    """

    idx: torch.Tensor
    g: torch.Tensor
    shape: torch.Size  # (num_rows, d)
    masked: bool = True  # False: no index is -1 (no padding_idx, no grouping), so nothing to mask

    @property
    def units(self) -> int:
        return self.idx.shape[0]

    def _valid_g(self) -> torch.Tensor:
        """``[U, T, d]``: the output gradients, zero where the index is -1 (no gradient)."""
        if not self.masked:
            return self.g
        return torch.where((self.idx >= 0).unsqueeze(-1), self.g, torch.zeros_like(self.g))

    def sq_norms(self) -> torch.Tensor:
        u, t = self.idx.shape
        rows = self.shape[0]
        unit = torch.arange(u, device=self.idx.device).unsqueeze(1)
        keys = (unit * rows + self.idx.clamp(min=0)).reshape(-1)
        order = torch.argsort(keys)
        sorted_keys = keys[order]
        # Segment number of each sorted position: how many distinct keys come before it.
        starts = torch.ones_like(sorted_keys, dtype=torch.long)
        starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
        segment = torch.cumsum(starts, 0) - 1
        g = self._valid_g().reshape(u * t, -1)[order]
        sums = g.new_zeros(u * t, g.shape[-1]).index_add_(0, segment, g)
        # The unit of each segment (all its keys share it); unused segments are zero and add nothing.
        seg_unit = torch.zeros(u * t, dtype=torch.long, device=keys.device).scatter_(0, segment, sorted_keys // rows)
        return g.new_zeros(u).index_add_(0, seg_unit, sq_norms(sums))

    def per_unit(self) -> torch.Tensor:
        u = self.units
        keys = (torch.arange(u, device=self.idx.device).unsqueeze(1) * self.shape[0] + self.idx.clamp(min=0))
        out = self.g.new_zeros(u * self.shape[0], self.shape[1])
        return out.index_add_(0, keys.reshape(-1), self._valid_g().reshape(-1, self.shape[1])).reshape(u, *self.shape)

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        scaled = (self._valid_g() * w.view(-1, 1, 1)).reshape(-1, self.shape[1])
        return self.g.new_zeros(*self.shape).index_add_(0, self.idx.clamp(min=0).reshape(-1), scaled)

    def grouped(self, sizes: list[int]) -> RowsFactor:
        return RowsFactor(group_rows(self.idx, sizes, fill=-1), group_rows(self.g, sizes), self.shape)


@dataclass
class StackedFactor:
    """A parameter made of row blocks ``[P_1; P_2; ...]``, each with its own factor of shape ``[rows_k, ...]``.

    Blocks are disjoint, so the squared norms add and the gradients concatenate.
    """

    parts: list
    shape: torch.Size

    @property
    def units(self) -> int:
        return self.parts[0].units

    def sq_norms(self) -> torch.Tensor:
        return sum(p.sq_norms() for p in self.parts)

    def per_unit(self) -> torch.Tensor:
        u = self.units
        return torch.cat([p.per_unit().reshape(u, -1) for p in self.parts], 1).reshape(u, *self.shape)

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.weighted(w).reshape(-1) for p in self.parts]).reshape(self.shape)

    def grouped(self, sizes: list[int]) -> StackedFactor:
        return StackedFactor([p.grouped(sizes) for p in self.parts], self.shape)


Factor = OuterFactor | SumFactor | RowsFactor | StackedFactor


def _tied_pair(fs: list[Factor]) -> tuple[RowsFactor, OuterFactor] | None:
    """The (embedding, output layer) uses of a tied weight, if that is what ``fs`` is."""
    if len(fs) != 2:
        return None
    rows = next((f for f in fs if isinstance(f, RowsFactor)), None)
    outer = next((f for f in fs if isinstance(f, OuterFactor)), None)
    if rows is None or outer is None or outer.x.shape[2] != 1:
        return None
    return rows, outer


def tied_sq_norms(fs: list[Factor]) -> torch.Tensor | None:
    """``||g_rows + g_outer||^2`` per unit for a weight tied between an embedding and an output layer,
    without materialising per-sample ``[V, d]`` gradients; None when materialising is cheaper.

    The cross term is ``<g_outer, g_rows> = sum_{t,s} G_t[tok_s] <X_t, E_s>`` (output layer: inputs
    ``X``, output gradients ``G``; embedding: tokens ``tok``, output gradients ``E``), cost
    ``T S d`` per unit against ``T d V`` for materialising.
    """
    pair = _tied_pair(fs)
    if pair is None:
        return None
    rows, outer = pair
    u, t, _, d = outer.x.shape
    v, s = outer.g.shape[-1], rows.idx.shape[1]
    own = min(t * t * (d + v), t * d * v) if outer.ghost_is_cheaper() else t * d * v
    if own + t * s * (d + 1) >= t * d * v + 2 * v * d:
        return None
    x, g = outer.x[:, :, 0, :], outer.g[:, :, 0, :]
    picked = torch.gather(g, 2, rows.idx.clamp(min=0).unsqueeze(1).expand(u, t, s))  # G_t[tok_s]
    products = x @ rows.g.transpose(1, 2)  # <X_t, E_s>
    cross = picked * products
    if rows.masked:
        cross = torch.where((rows.idx >= 0).unsqueeze(1), cross, torch.zeros_like(cross))
    cross = cross.sum((1, 2))
    return rows.sq_norms() + outer.sq_norms() + 2 * cross
