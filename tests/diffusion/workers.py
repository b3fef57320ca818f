"""Run on each rank by the distributed TIW-DSM test (importable by the spawned workers)."""

import torch
import torch.distributed as dist

from reweighting.diffusion import TimeDependentRatio, TimeMLP, VPLinear, tiw_dsm_loss

from .gaussian import ExactGaussianLogit

SIZES = (3, 5)  # unequal per-rank batch sizes on purpose


def global_batch():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    schedule = VPLinear()
    return torch.randn(n, 2, generator=g), schedule.sample_time(n, generator=g), torch.randn(n, 2, generator=g)


def setup():
    torch.manual_seed(0)
    schedule = VPLinear()
    model = TimeMLP(2, hidden=16, depth=2)
    ratio = TimeDependentRatio(ExactGaussianLogit(torch.tensor([1.0, -0.5]), schedule), reference_fraction=0.1)
    return schedule, model, ratio


def gradient(model, x0, t, noise, self_normalize, schedule, ratio):
    loss, per_sample = tiw_dsm_loss(model, x0, schedule, ratio, t=t, noise=noise, self_normalize=self_normalize)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), per_sample.detach()


def single_process(self_normalize):
    x0, t, noise = global_batch()
    schedule, model, ratio = setup()
    return gradient(model, x0, t, noise, self_normalize, schedule, ratio)


def tiw_dsm_gradients(rank, world):
    """Plain and self-normalised: this rank's gradient averaged over ranks as DDP does, and its per-sample losses."""
    x0, t, noise = global_batch()
    start = sum(SIZES[:rank])
    sl = slice(start, start + SIZES[rank])
    out = {}
    for self_normalize in (False, True):
        schedule, model, ratio = setup()
        grad, per_sample = gradient(model, x0[sl], t[sl], noise[sl], self_normalize, schedule, ratio)
        dist.all_reduce(grad)
        out[self_normalize] = (grad / world, per_sample)
    return out
