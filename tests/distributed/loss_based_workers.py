"""LossReweighter runs on each rank of the distributed tests (importable by the spawned workers)."""

import torch

import reweighting as rw

SIZES = (3, 6)  # unequal per-rank batch sizes on purpose
CASES = [
    {"strategy": "linupper", "normalize": "minmax"},
    {"strategy": "quadratic", "normalize": "minmax"},
    {"strategy": "extremes", "normalize": "rank"},
    {"strategy": "inverse", "normalize": "quantile"},
    {"strategy": "uniform", "normalize": "minmax"},
]


def global_batch():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    return torch.randn(n, 4, generator=g), torch.randn(n, generator=g)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def loss_fn(model):
    return lambda b: (model(b[0]).squeeze(1) - b[1]) ** 2


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def my_slice(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def run_case(case, x, y, average=None):
    """Weights, loss value, gradient and stats of one step (gradients averaged over ranks as DDP does)."""
    model = make_model()
    r = rw.LossReweighter(temperature=0.4, **case)
    loss = r(loss_fn(model)((x, y)))
    loss.backward()
    g = grads(model)
    value = loss.detach().clone()
    if average is not None:
        g, value = average(g), average(value)
    return {"weights": r.weights(loss_fn(model)((x, y)).detach()), "loss": value, "grad": g,
            "stats": r.stats.as_dict()}


def run_window(x, y, cut, average=None):
    """accumulation='global' over two micro-batches cut at ``cut``."""
    model = make_model()
    r = rw.LossReweighter("linupper", temperature=0.4, accumulation="global")
    value = r.accumulate([(x[:cut], y[:cut]), (x[cut:], y[cut:])], loss_fn(model))
    g = grads(model)
    if average is not None:
        g, value = average(g), average(value)
    return {"loss": value, "grad": g, "stats": r.stats.as_dict()}


def on_rank(rank, world):
    x, y = global_batch()
    sl = my_slice(rank)

    def average(t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t / world

    out = {"cases": [run_case(c, x[sl], y[sl], average) for c in CASES],
           "window": run_window(x[sl], y[sl], 1 if rank == 0 else 4, average)}
    # a NaN on rank 1 only: every rank must raise (none may wait forever in a collective)
    losses = torch.arange(1.0, SIZES[rank] + 1)
    if rank == 1:
        losses[2] = float("nan")
    try:
        rw.LossReweighter()(losses)
        out["nan_error"] = None
    except ValueError as err:
        out["nan_error"] = str(err)
    zero = rw.LossReweighter("linupper", nonfinite="zero")
    zero(losses)
    out["nan_zero_stats"] = zero.stats.as_dict()
    return out  # launch() serialises the tensors by value


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "all_gather_coalesced", "_all_gather_base", "all_gather_object", "broadcast", "broadcast_object_list",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
               "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter", "barrier")


def count_collectives(rank, world):
    """Collectives issued by one rw(...) call, per normalisation and policy (wrapping torch.distributed)."""
    import torch.distributed as dist

    counter = {"n": 0}
    originals = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def wrapped(*a, _fn=fn, **k):
            counter["n"] += 1
            return _fn(*a, **k)
        setattr(dist, name, wrapped)
    x, y = global_batch()
    sl = my_slice(rank)
    out = {}
    try:
        for normalize in ("minmax", "quantile", "rank"):
            for strategy in ("linupper", "uniform"):
                for options in ({}, {"nonfinite": "zero"}):
                    model = make_model()
                    r = rw.LossReweighter(strategy, normalize=normalize, **options)
                    losses = loss_fn(model)((x[sl], y[sl]))
                    keep = torch.ones_like(losses, dtype=torch.bool)
                    keep[0] = rank == 0  # rank 1 excludes its first sample
                    for masked in (False, True):
                        counter["n"] = 0
                        loss = r(losses, mask=keep if masked else None)
                        out[(normalize, strategy, options.get("nonfinite", "raise"), masked)] = counter["n"]
                        loss.backward(retain_graph=True)
        # a batch larger than the gather's first buffer: the buffer grows once, on every rank alike
        big = torch.arange(300.0 + rank)
        r = rw.LossReweighter("linupper")
        counter["n"] = 0
        r(big)
        out["grow"] = counter["n"]
        counter["n"] = 0
        r(big)
        out["after_grow"] = counter["n"]
        out["big_weights"] = r.weights(big)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    # a mask across ranks equals one process with the same mask
    model = make_model()
    r = rw.LossReweighter("linupper", normalize="rank")
    losses = loss_fn(model)((x[sl], y[sl]))
    keep = torch.ones_like(losses, dtype=torch.bool)
    keep[1] = False
    losses = torch.where(keep, losses, torch.full_like(losses, float("nan")))  # excluded: any value
    out["masked_weights"] = r.weights(losses.detach(), mask=keep)
    out["masked_stats"] = r.stats.as_dict()
    return out
