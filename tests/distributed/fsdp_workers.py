"""LossReweighter training runs under FSDP2 (``fully_shard``) on each rank (importable by spawned workers).

The same global batches train one unsharded model in one process (the reference) and a
``fully_shard`` model on two gloo ranks, each holding a different number of the batch's samples.
"""

from contextlib import contextmanager

import torch

import reweighting as rw

SIZES = (3, 5)  # unequal per-rank batch sizes on purpose
CUTS = (1, 3)  # where each rank splits its share into two micro-batches (sizes 1+2 and 3+2)
STEPS = 3
LR = 0.3
CASES = [
    {"strategy": "linupper", "normalize": "minmax"},
    {"strategy": "quadratic", "normalize": "rank"},
    {"strategy": "extremes", "normalize": "quantile"},
]
# accumulation="global" over two micro-batches per rank: with gradient sync held back until the
# last micro-batch (set_requires_gradient_sync), and with a reduce-scatter after each one.
WINDOWS = [
    {"strategy": "linupper", "normalize": "minmax", "hold_sync": True},
    {"strategy": "linupper", "normalize": "minmax", "hold_sync": False},
    {"strategy": "quadratic", "normalize": "rank", "hold_sync": True},
]


def global_batches():
    """One global batch per optimizer step (the single-process run sees each whole)."""
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    return [(torch.randn(n, 4, generator=g), torch.randn(n, generator=g)) for _ in range(STEPS)]


def make_model():
    # The last layer's weight [1, 6] and bias [1] have fewer rows than ranks: rank 1's shard is empty.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def loss_fn(model):
    return lambda b: (model(b[0]).squeeze(1) - b[1]) ** 2


def my_slice(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def full_parameters(model):
    """Every parameter, gathered whole (``DTensor.full_tensor``) on a sharded model."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def train(model, case, batches, window=False, no_sync=None):
    """``STEPS`` SGD steps of ``LossReweighter(**case)``; returns the loss value of each step."""
    r = rw.LossReweighter(temperature=0.4, accumulation="global" if window else "micro", **case)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    values = []
    for x, y in batches:
        if window:
            cut = CUTS[torch.distributed.get_rank()] if torch.distributed.is_initialized() else len(x)
            value = r.accumulate([(x[:cut], y[:cut]), (x[cut:], y[cut:])], loss_fn(model), no_sync=no_sync)
        else:
            loss = r(loss_fn(model)((x, y)))
            loss.backward()
            value = loss.detach()
        opt.step()
        opt.zero_grad()
        r.step()
        values.append(value.clone())
    return torch.stack(values)


def reference(case):
    """The single-process run on the whole global batches: final parameters and per-step losses."""
    model = make_model()
    values = train(model, case, global_batches())
    return {"params": full_parameters(model), "loss": values}


def sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def on_rank(rank, world):
    sl = my_slice(rank)
    batches = [(x[sl], y[sl]) for x, y in global_batches()]

    def mean_over_ranks(t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t / world

    out = {"cases": [], "windows": []}
    for case in CASES:
        model = sharded_model()
        values = train(model, case, batches)
        out["cases"].append({"params": full_parameters(model), "loss": mean_over_ranks(values),
                             "sharded": all(hasattr(p, "full_tensor") for p in model.parameters())})
    for spec in WINDOWS:
        case = {k: v for k, v in spec.items() if k != "hold_sync"}
        model = sharded_model()

        @contextmanager
        def held_sync(model=model):
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        with counting_reduce_scatters() as count:
            values = train(model, case, batches, window=True, no_sync=held_sync if spec["hold_sync"] else None)
        out["windows"].append({"params": full_parameters(model), "loss": mean_over_ranks(values),
                               "sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
                               "reduce_scatters": count["n"]})
    return out


@contextmanager
def counting_reduce_scatters():
    """Count the gradient reduce-scatters FSDP2 issues, to see that held-back sync is really held back.

    FSDP2 calls ``dist.reduce_scatter_single`` (``reduce_scatter_tensor`` in older torch); only
    outermost calls count, in case one is built on the other.
    """
    import torch.distributed as dist

    count = {"n": 0, "depth": 0}
    originals = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")
                 if hasattr(dist, name)}

    def wrap(fn):
        def counted(*args, **kwargs):
            count["n"] += count["depth"] == 0
            count["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                count["depth"] -= 1
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
