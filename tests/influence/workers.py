"""Functions run on each rank by the distributed self-influence tests (importable by spawned workers)."""

import torch

from reweighting.influence import PresenceReweighter, SelfInfluence, score_dataset

from . import models as M

SIZES = (3, 5)  # unequal per-rank batch sizes on purpose


def global_batch():
    return M.seq_batch(b=sum(SIZES), seed=3)


def presence_step_and_scores(rank, world, tau):
    """This rank's PRESENCE weights and update, and the sharded offline scores of the whole batch."""
    tokens, mask = global_batch()
    lo = sum(SIZES[:rank])
    tokens, mask = tokens[lo : lo + SIZES[rank]], mask[lo : lo + SIZES[rank]]
    model = M.SeqModel()
    si = SelfInfluence(model, broadcast=[model.pos])
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    w = PresenceReweighter(switch_step=0, tau_second=tau).backward(si, losses)
    # NumPy arrays travel by value; tensors would be shared through file descriptors of an exiting process.
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    everything = torch.utils.data.TensorDataset(*global_batch())
    scores = score_dataset(M.SeqModel(), everything, M.seq_loss, batch_size=2, broadcast=["pos"], progress=False)
    return w.numpy(), grads, scores.numpy()


def _shard(rank):
    tokens, mask = global_batch()
    lo = sum(SIZES[:rank])
    return tokens[lo : lo + SIZES[rank]], mask[lo : lo + SIZES[rank]]


def fsdp2_presence_steps(rank, world, steps):
    """PRESENCE + SGD on a ``fully_shard`` model: gradient types and the full parameters after ``steps``."""
    from torch.distributed.fsdp import fully_shard

    tokens, mask = _shard(rank)
    model = M.SeqModel()
    fully_shard(model.fc)
    fully_shard(model)
    si = SelfInfluence(model, broadcast=[model.pos])
    presence = PresenceReweighter(switch_step=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    kinds = []
    for _ in range(steps):
        with si.capture():
            losses = M.seq_loss(model, tokens, mask)
        presence.backward(si, losses)
        kinds.append({n: (type(p.grad).__name__, str(p.grad.placements), tuple(p.grad.to_local().shape))
                      for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    full = {n: p.full_tensor().detach().numpy() for n, p in model.named_parameters()}
    placements = {n: (str(p.placements), tuple(p.to_local().shape)) for n, p in model.named_parameters()}
    return kinds, placements, full


class TwoHeads(torch.nn.Module):
    """A shared layer and one head per rank: a data-dependent branch that leaves a module unused on a rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 6)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 2), torch.nn.Linear(6, 2)])

    def forward(self, x, head):
        return self.heads[head](torch.tanh(self.body(x)))


def two_heads_loss(model, x, y, head):
    return ((model(x, head) - y) ** 2).sum(1)


def two_heads_data(rank):
    g = torch.Generator().manual_seed(7 + rank)
    return torch.randn(SIZES[rank], 4, generator=g), torch.randn(SIZES[rank], 2, generator=g)


def rank_dependent_presence(rank, world):
    """PRESENCE on a model whose rank r uses head r only (and no head at all for the second call)."""
    model = TwoHeads()
    x, y = two_heads_data(rank)
    si = SelfInfluence(model)
    with si.capture():
        losses = two_heads_loss(model, x, y, rank)
    w = PresenceReweighter(switch_step=0).backward(si, losses)
    return w.numpy(), {n: (None if p.grad is None else p.grad.numpy()) for n, p in model.named_parameters()}


def fsdp2_and_rank_dependent(rank, world, steps):
    """Both checks in one launch (each launch costs process start-up)."""
    return fsdp2_presence_steps(rank, world, steps), rank_dependent_presence(rank, world)
