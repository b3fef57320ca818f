"""The weighted update under ``torch.distributed``: gradients summed over ranks.

Plain parameters go in one all-reduce; ``DTensor`` parameters (FSDP2's ``fully_shard``) sharded on
dim 0 of a 1-d mesh in one reduce-scatter per mesh; any other placement by a redistribution of a
``Partial`` tensor. Every rank contributes every parameter (zeros where a module did not run), so
ranks that used different modules stay in step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as D

__all__ = ["reduce_updates", "is_dtensor"]


def reduce_updates(updates: list[tuple[nn.Parameter, torch.Tensor | None]], device, group) -> list:
    """Sum the gradients over ranks: one all-reduce for plain parameters, one reduce-scatter per
    device mesh for ``DTensor`` parameters sharded on dim 0 (FSDP2), and a redistribution per
    parameter for any other placement."""
    plain = [(p, g) for p, g in updates if not is_dtensor(p)]
    sharded = [(p, g) for p, g in updates if is_dtensor(p) and not _dim0_sharded(p)]
    by_mesh: dict[int, list] = {}
    for p, g in updates:
        if is_dtensor(p) and _dim0_sharded(p):
            by_mesh.setdefault(id(p.device_mesh), []).append((p, g))
    out = []
    if plain:
        full = [g if g is not None else torch.zeros(p.shape, device=device) for p, g in plain]
        flat = D.all_reduce_sum(torch.cat([g.reshape(-1).float() for g in full]), group)
        out += [(p, v.view(p.shape)) for (p, _), v in zip(plain, flat.split([g.numel() for g in full]))]
    for items in by_mesh.values():
        out += _reduce_scatter_dim0(items, device)
    for p, g in sharded:
        out.append((p, _reduce_scatter_like(p, g, device)))
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


def is_dtensor(t) -> bool:
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
