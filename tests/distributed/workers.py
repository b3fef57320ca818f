"""Functions run on each rank by the distributed tests (importable by the spawned workers)."""

import torch

import reweighting as rw
from reweighting import distributed as D

SIZES = (3, 5)  # unequal per-rank batch sizes on purpose


def global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    return torch.randn(n, 4, generator=g), torch.randn(n, generator=g)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def per_sample_loss(model, x, y):
    return (model(x).squeeze(1) - y) ** 2


def weight_fn(losses):
    return rw.tilt(rw.minmax_normalize(losses), 0.4)


def my_slice(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def gradient_of_weighted_loss(rank, world):
    """DDP-style: each rank's gradient of weighted_loss, then averaged over ranks as DDP does."""
    x, y = global_batch()
    sl = my_slice(rank)
    model = make_model()
    losses = per_sample_loss(model, x[sl], y[sl])
    w = weight_fn(losses.detach())
    rw.weighted_loss(losses, w).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.distributed.all_reduce(grads)
    return grads / world, w


def gradient_over_accumulation_window(rank, world):
    x, y = global_batch()
    sl = my_slice(rank)
    xs, ys = x[sl], y[sl]
    model = make_model()
    cut = 1 if rank == 0 else 2  # unequal micro-batches too
    micro = [(xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])]
    w, _ = rw.accumulate_weighted(micro, lambda b: per_sample_loss(model, *b), weight_fn)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.distributed.all_reduce(grads)
    return grads / world, w


def normalisations(rank, world):
    _, y = global_batch(1)
    local = y[my_slice(rank)] * 3
    return {
        "minmax": rw.minmax_normalize(local),
        "zscore": rw.zscore(local),
        "rank": rw.rank_normalize(local),
        "quantile": rw.quantile_normalize(local, q=0.1),
        "tilt": rw.tilt(local, 0.7),
        "stats": rw.weight_stats(rw.tilt(local, 0.7)).as_dict(),
        "gathered": D.all_gather_uneven(local)[0],
        "counts": rw.resample_counts(local.abs(), 1000, generator=torch.Generator().manual_seed(5)),
    }



def gather_half_precision_rows(rank, world):
    """Each rank's bf16 rows (301 on rank 0: not a bf16 number; 7 on rank 1) gathered with gather_rows."""
    x = torch.full(((301, 7)[rank], 2), float(rank), dtype=torch.bfloat16)
    rows, counts, _ = D.gather_rows(x, 4)
    return {"counts": counts, "dtype": str(rows.dtype), "rows": rows.float()}
