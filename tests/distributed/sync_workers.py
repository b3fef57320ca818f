"""A loss-based DDP step on each rank, with host syncs counted (importable by the spawned workers)."""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import reweighting as rw
import reweighting.distributed as D
from tests.influence.test_syncs import SyncCounter

from . import loss_based_workers as LB

CASES = (("linupper", "minmax"), ("extremes", "rank"), ("inverse", "quantile"), ("uniform", "minmax"))


def step_syncs(rank, world):
    """Host syncs of DDP steps with checks off, and the weights they give (unequal per-rank batches)."""
    x, y = LB.global_batch()
    sl = LB.my_slice(rank)
    model = LB.make_model()
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = {"syncs": [], "weights": [], "losses": []}
    with rw.checks(False):
        for strategy, normalize in CASES:
            r = rw.LossReweighter(strategy, normalize=normalize, temperature=0.4)
            for masked in (False, True):
                keep = torch.ones(LB.SIZES[rank], dtype=torch.bool)
                keep[0] = not masked or rank == 0  # rank 1 leaves out its first sample when masked
                with SyncCounter() as counter:
                    losses = LB.loss_fn(ddp)((x[sl], y[sl]))
                    loss = r(losses, mask=keep)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    r.step()
                out["syncs"].append(counter.syncs)
                out["weights"].append(r.weights(losses.detach(), mask=keep))
                out["losses"].append(losses.detach())
        # too large for the buffer, on every rank (a rank alone would leave the other in the collective)
        r = rw.LossReweighter("linupper")
        r.gather_capacity = 2
        try:
            r(torch.arange(float(LB.SIZES[rank])))
            out["overflow"] = None
        except ValueError as err:
            out["overflow"] = str(err)
    # the gather itself: half-precision rows, counts beyond bf16's exact integers, truncation
    values = torch.arange(300 + rank, dtype=torch.bfloat16).reshape(-1, 1)
    rows, valid, counts = D.gather_padded(values, 512)
    out["padded"] = (rows, valid, counts)
    out["truncated"] = D.gather_padded(values, 4, truncate=True)
    return out
