"""Q-probe (Li et al., 2024; docs/methods/qprobe.md): reweighting sampled completions of a language model.

Draw k completions per prompt, embed each, score it with a linear probe ``Q = theta . phi + b`` and
pick one by sampling from ``softmax(Q / beta)``. Probes are trained with ``L_Q``, ``L_CE``, ``L_PG``
or ``L_QP`` (:mod:`.objectives`, :func:`fit_probe`) and evaluated by the exact chunked expected
return against pass@1 and pass@k (:mod:`.evaluate`). Features come from a Hugging Face causal LM
during ``generate`` (:mod:`.features`) or from an API (:mod:`.api`); rewards from answer matching
(:mod:`.rewards`) or sandboxed code execution (:mod:`.sandbox`).
"""

from .api import POOLINGS, APIError, OpenAICompatible, RedirectError, sample_and_embed
from .evaluate import evaluate_probe, expected_return, mean_reward, pass_at_k
from .features import Samples, sample_with_features
from .fit import chunk_groups, fit_probe, has_reward_signal
from .objectives import OBJECTIVES, bce_loss, mse_loss, pg_loss, preference_loss
from .probe import QProbe
from .rewards import exact_match, extract_number, numeric_match
from .sandbox import (
    ExecutionResult,
    SandboxLimits,
    SandboxUnavailable,
    TestedProgram,
    code_reward,
    humaneval_program,
    run_program,
    run_programs,
)
from .select import select, selection_weights

__all__ = [
    "has_reward_signal",
    "APIError",
    "OBJECTIVES",
    "POOLINGS",
    "RedirectError",
    "ExecutionResult",
    "OpenAICompatible",
    "QProbe",
    "SandboxLimits",
    "SandboxUnavailable",
    "Samples",
    "TestedProgram",
    "code_reward",
    "exact_match",
    "extract_number",
    "humaneval_program",
    "numeric_match",
    "run_program",
    "run_programs",
    "sample_and_embed",
    "sample_with_features",
    "bce_loss",
    "chunk_groups",
    "evaluate_probe",
    "expected_return",
    "fit_probe",
    "mean_reward",
    "mse_loss",
    "pass_at_k",
    "pg_loss",
    "preference_loss",
    "select",
    "selection_weights",
]
