"""Functions run on each rank by the distributed noisy-label tests (importable by spawned workers)."""

import torch

from reweighting.noisy_labels import noisy_label_loss, pair_transition

SIZES = (3, 5)  # unequal per-rank batch sizes on purpose
C = 4
LOSSES = ("reweight", "dws", "rent")


def global_batch():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    return torch.randn(n, 6, generator=g), torch.randint(0, C, (n,), generator=g)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, C)


def gradient(model, x, y, loss):
    model.zero_grad()
    value = noisy_label_loss(loss, model(x), y, pair_transition(C, 0.3),
                             generator=torch.Generator().manual_seed(7))
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def single_process_gradients():
    x, y = global_batch()
    model = make_model()
    return {loss: gradient(model, x, y, loss) for loss in LOSSES}


def averaged_gradients(rank, world):
    """Each rank's gradient on its slice, averaged over ranks as DDP does.

    Returned as plain lists: a tensor sent through the result queue is shared by file descriptor,
    which the parent cannot fetch once this process has exited.
    """
    x, y = global_batch()
    start = sum(SIZES[:rank])
    sl = slice(start, start + SIZES[rank])
    model = make_model()
    out = {}
    for loss in LOSSES:
        grad = gradient(model, x[sl], y[sl], loss)
        torch.distributed.all_reduce(grad)
        out[loss] = (grad / world).tolist()
    return out
