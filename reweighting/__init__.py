"""reweighting: per-sample reweighting and resampling for PyTorch, in training and at inference.

The weight core is re-exported here flat; each method lives in its own module or subpackage.
"""

from typing import TYPE_CHECKING, Any

from .checks import checks, checks_enabled, set_checks
from .packing import document_index, document_losses, pack_documents
from .reduce import accumulate_weighted, restore_rng_state, score_window, sequence_loss, weighted_loss
from .resample import dirichlet_weights, multinomial_resample, resample_counts, systematic_resample
from .weights import (
    NORMALIZATIONS,
    WeightStats,
    minmax_normalize,
    normalize,
    quantile_normalize,
    rank_normalize,
    tilt,
    weight_stats,
    zscore,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # type checkers see the lazily imported names below with their real types
    from .influence import PresenceReweighter as PresenceReweighter
    from .influence import SelfInfluence as SelfInfluence
    from .loss_based import LossReweighter as LossReweighter
    from .qprobe import QProbe as QProbe
    from .sampler import AliasTable as AliasTable
    from .sampler import DistributedWeightedSampler as DistributedWeightedSampler

# Methods are imported on first use, so that ``import reweighting`` stays light (no
# transformers, no scikit-learn) and each method's dependencies load only when it is used.
_LAZY = {
    "LossReweighter": "reweighting.loss_based",
    "SelfInfluence": "reweighting.influence",
    "PresenceReweighter": "reweighting.influence",
    "DistributedWeightedSampler": "reweighting.sampler",
    "AliasTable": "reweighting.sampler",
    "QProbe": "reweighting.qprobe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reweighting' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    *_LAZY,
    "NORMALIZATIONS",
    "WeightStats",
    "accumulate_weighted",
    "checks",
    "checks_enabled",
    "dirichlet_weights",
    "document_index",
    "document_losses",
    "minmax_normalize",
    "multinomial_resample",
    "normalize",
    "pack_documents",
    "quantile_normalize",
    "rank_normalize",
    "resample_counts",
    "restore_rng_state",
    "score_window",
    "sequence_loss",
    "set_checks",
    "systematic_resample",
    "tilt",
    "weight_stats",
    "weighted_loss",
    "zscore",
]
