"""Self-influence: exact per-sample gradient norms (ghost norms per layer type, a ``torch.func``
reference) and PRESENCE reweighting (docs/methods/presence.md)."""

from .engine import SelfInfluence, microbatch_sizes
from .offline import drop_highest, load_scores, score_dataset
from .presence import PresenceReweighter, presence_weights
from .reference import per_sample_grads, per_sample_grads_loop, per_sample_sq_norms

__all__ = [
    "SelfInfluence",
    "PresenceReweighter",
    "presence_weights",
    "microbatch_sizes",
    "score_dataset",
    "drop_highest",
    "load_scores",
    "per_sample_grads",
    "per_sample_grads_loop",
    "per_sample_sq_norms",
]
