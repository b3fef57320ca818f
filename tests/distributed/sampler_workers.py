"""What each rank runs in the sampler's process-group test (a light module: spawned workers import it)."""

import torch

from reweighting.sampler import DistributedWeightedSampler


def draw_on_rank(rank, world):
    sampler = DistributedWeightedSampler(torch.arange(1.0, 31.0), num_samples=45, seed=11, chunk_size=8)
    sampler.set_epoch(2)
    return sampler.num_replicas, sampler.rank, list(sampler)
