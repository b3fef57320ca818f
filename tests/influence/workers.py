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
