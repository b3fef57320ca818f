"""A user's program written against the public API, with the types a user would write.

``tests/test_packaging.py`` type-checks it with mypy (strict) against the installed package, whose
``py.typed`` marker makes its annotations visible, and also runs it. A public signature that changes
a type, loses an annotation a user relies on, or stops being importable fails the check.
"""

from __future__ import annotations

import torch

import reweighting as rw
from reweighting.diffusion import VPCosine, denoising_target
from reweighting.noisy_labels import check_transition, forward_loss, importance_weights
from reweighting.packing import document_losses
from reweighting.qprobe import QProbe, expected_return, fit_probe, select
from reweighting.sampler import AliasTable, DistributedWeightedSampler


def core() -> float:
    loss: torch.Tensor = torch.tensor([0.5, 1.0, 2.0, 4.0], requires_grad=True)
    h: torch.Tensor = rw.minmax_normalize(loss.detach())
    w: torch.Tensor = rw.tilt(torch.clamp(h + 1, max=1), temperature=0.4)
    total: torch.Tensor = rw.weighted_loss(loss, w)
    stats: dict[str, float] = rw.weight_stats(w).as_dict(prefix="weights/")
    seq: torch.Tensor = rw.sequence_loss(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))
    return stats["weights/ess"] + float(seq.sum()) + float(total)


def reweighter() -> int:
    method: rw.LossReweighter = rw.LossReweighter("quadratic", temperature=0.4, warmup_steps=0)
    weights: torch.Tensor = method.weights(torch.tensor([0.1, 0.2, 0.3]))
    method.step()
    state: dict[str, object] = method.state_dict()
    return int(weights.numel()) + len(state)


def sampling() -> list[int]:
    table: rw.AliasTable = AliasTable(torch.tensor([1.0, 2.0, 3.0]))
    drawn: torch.Tensor = table.sample(5, generator=torch.Generator().manual_seed(0))
    sampler = DistributedWeightedSampler(torch.ones(8), num_samples=4, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    return [int(i) for i in drawn] + list(iter(sampler))


def methods() -> float:
    T: torch.Tensor = torch.tensor([[0.8, 0.3], [0.2, 0.7]])
    check_transition(T)
    logits, y = torch.zeros(3, 2), torch.tensor([0, 1, 1])
    w: torch.Tensor = importance_weights(logits, y, T)
    fl: torch.Tensor = forward_loss(logits, y, T)
    schedule = VPCosine()
    target: torch.Tensor = denoising_target("eps", torch.zeros(2, 1), torch.ones(2, 1), torch.ones(2), torch.ones(2))
    docs = document_losses(torch.rand(1, 4), position_ids=torch.tensor([[0, 1, 0, 1]]))
    return float(w.sum() + fl + target.sum() + docs.loss.sum()) + float(schedule.sigma(torch.tensor([0.5])).sum())


def qprobe() -> float:
    features, rewards = torch.randn(16, 3), (torch.arange(16) % 2).float()
    probe: QProbe = fit_probe(features, rewards, torch.arange(16) // 4, objective="pg", group_size=2, epochs=1,
                              batch_size=8, progress=False)
    q: torch.Tensor = probe.score(features.reshape(4, 4, 3))
    choice, weights = select(q, beta=0.1, generator=torch.Generator().manual_seed(0))
    value: torch.Tensor = expected_return(q, rewards.reshape(4, 4), k=2, beta=0.1)
    return float(value) + float(choice.sum()) + float(weights.sum())


if __name__ == "__main__":
    print(core(), reweighter(), sampling(), methods(), qprobe())
