"""One replicate of a Q-probe study: fit the probes, tune beta on held-out prompts, score on the test prompts.

Shared by ``qprobe`` (a tiny GPT) and ``qprobe-smollm2``. A replicate has three disjoint sets of
prompts, each with several sampled completions, their 0/1 rewards and features: *fit* (the probes
learn from these), *validation* (beta is chosen on these) and *test* (the verdict is computed on
these). Four probes are fitted: ``L_Q``, ``L_CE`` and ``L_PG`` on the rewards, and a control,
``L_PG`` on the rewards shuffled among the completions of each fit prompt, which breaks the link
between a completion and its reward and so must select no better than one random sample (pass@1).

Each probe is scored on the test prompts by the exact chunked expected return of ``softmax(Q / beta)``
selection among k samples, for every beta of the grid; its *tuned* result at k uses the beta with the
best mean expected return over the validation prompts at that k (``min(k, samples per validation
prompt)``), chosen by ``select_best`` with the validation prompts as its units, so the stability
reported is the share of bootstrap resamples of the validation prompts that pick the same beta.
The paper's fixed beta (0.1) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .protocol import PartSpec
from .stats import select_best

__all__ = ["OBJECTIVES", "CONTROL", "TUNED", "PAPER_BETA", "PAPER_SHARE", "SampleSet", "part_names",
           "declare_parts", "per_prompt_return", "tune_beta", "shuffle_within_prompts", "fit_and_evaluate"]

OBJECTIVES = {"L_Q": "mse", "L_CE": "bce", "L_PG": "pg"}
CONTROL = "shuffled L_PG"  # L_PG fitted on rewards shuffled within each prompt
TUNED = "tuned"  # the key of each probe's results at its beta chosen on the validation prompts
PAPER_BETA = 0.1
# The paper's gains at k = 48 on MBPP (Code-LLaMA-7B) as shares of its headroom pass@48 - pass@1 =
# 0.76 - 0.29 = 0.47: L_Q +0.09, L_CE +0.11, L_PG +0.17 over pass@1; L_PG over L_CE +0.06, over L_Q
# +0.08. A study's expected effect is the share times its own headroom at its largest k.
PAPER_SHARE = {"L_Q > pass@1": 0.09 / 0.47, "L_CE > pass@1": 0.11 / 0.47, "L_PG > pass@1": 0.17 / 0.47,
               "L_PG > L_CE": 0.06 / 0.47, "L_PG > L_Q": 0.08 / 0.47}


@dataclass(frozen=True)
class SampleSet:
    """``features [P, n, D]`` and 0/1 ``rewards [P, n]`` of ``n`` completions of each of ``P`` prompts."""

    features: torch.Tensor
    rewards: torch.Tensor

    def __post_init__(self) -> None:
        f, r = self.features, self.rewards
        if f.dim() != 3 or r.dim() != 2 or f.shape[:2] != r.shape:
            raise ValueError(f"SampleSet: features must be [P, n, D] and rewards [P, n], got {tuple(f.shape)} "
                             f"and {tuple(r.shape)}")


def _steps(ks: Sequence[int]) -> list[tuple[int, int]]:
    # "keeps improving": every step of the k grid from the middle k up
    ks = sorted(ks)
    upper = [k for k in ks if k >= ks[len(ks) // 2]]
    return list(zip(upper, upper[1:]))


def part_names(ks: Sequence[int]) -> list[str]:
    """The claim's parts in their declared order, for the grid ``ks``."""
    k = max(ks)
    names = [f"{n} > pass@1 (k={k})" for n in OBJECTIVES]
    names += [f"L_PG > {other} (k={k})" for other in ("L_CE", "L_Q")]
    names += [f"L_PG improves from k={lo} to k={hi}" for lo, hi in _steps(ks)]
    names.append(f"control: shuffled-reward L_PG no better than pass@1 (k={k})")
    return names


def declare_parts(ks: Sequence[int], headroom: float, control_tolerance: float) -> tuple[PartSpec, ...]:
    """The parts for a protocol: expected effects are the paper's shares of its headroom times
    ``headroom`` (this study's pass@k - pass@1 at its largest k, from a pilot); "keeps improving" has
    no number in the paper (no expected effect); the control is "pass@1 not worse than the
    shuffled-reward probe" within ``control_tolerance`` (the probe must not beat one random sample)."""
    specs = []
    for name in part_names(ks):
        if name.startswith("control"):
            specs.append(PartSpec(name, kind="not worse", tolerance=control_tolerance))
        elif "improves" in name:
            specs.append(PartSpec(name))
        else:
            share = PAPER_SHARE[name.split(" (k=")[0]]
            specs.append(PartSpec(name, expected=round(share * headroom, 3)))
    return tuple(specs)


def per_prompt_return(q: torch.Tensor, rewards: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """Each prompt's mean over its disjoint chunks of ``k`` of ``sum_i softmax(Q_chunk / beta)_i r_i``
    (``[P]``; its mean over prompts is ``reweighting.qprobe.expected_return``)."""
    from ..qprobe.select import selection_weights

    p, n = rewards.shape
    chunks = n // k
    qc = q[:, : chunks * k].reshape(p * chunks, k)
    rc = rewards[:, : chunks * k].reshape(p * chunks, k).float()
    return (selection_weights(qc, beta) * rc).sum(dim=1).view(p, chunks).mean(dim=1)


def tune_beta(q_val: torch.Tensor, r_val: torch.Tensor, k: int, betas: Sequence[float], *, resamples: int,
              seed: int):
    """The beta of ``betas`` with the best mean expected return over the validation prompts at
    ``min(k, samples per prompt)``: a ``Selection`` whose stability is over resampled prompts."""
    k_fit = min(k, r_val.shape[1])
    scores = {float(b): per_prompt_return(q_val, r_val, k_fit, b).tolist() for b in betas}
    return select_best(scores, lower_is_better=False, resamples=resamples, seed=seed)


def shuffle_within_prompts(rewards: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``rewards [P, n]`` with each row permuted independently (same rewards per prompt, but no longer
    attached to the completions that earned them)."""
    order = torch.argsort(torch.rand(rewards.shape, generator=generator), dim=1)
    return torch.gather(rewards, 1, order)


def fit_and_evaluate(cfg, fit: SampleSet, val: SampleSet, test: SampleSet, seed: int, ctx) -> dict:
    """Fit the four probes on ``fit``, tune each one's beta per k on ``val``, evaluate on ``test``.

    ``cfg`` supplies ``ks``, ``betas``, ``probe_lr``, ``probe_epochs``, ``probe_batch``,
    ``weight_decay`` and ``beta_resamples``. Returns ``baseline`` (pass@1), ``pass_at_k``, ``probes``
    (``{probe: {beta or TUNED: {k: expected return}}}``), ``tuned_beta`` and ``beta_stability``
    (``{probe: {k: ...}}``).
    """
    from ..qprobe import QProbe, evaluate_probe, fit_probe, has_reward_signal

    n_fit, k_fit = fit.rewards.shape
    x_fit = fit.features.reshape(n_fit * k_fit, -1)
    groups = torch.arange(n_fit).repeat_interleave(k_fit)
    shuffled = shuffle_within_prompts(fit.rewards, torch.Generator().manual_seed(7919 * seed + 17))
    out: dict = {"probes": {}, "tuned_beta": {}, "beta_stability": {}}
    for name, objective in {**OBJECTIVES, CONTROL: "pg"}.items():
        rewards = shuffled if name == CONTROL else fit.rewards
        if objective == "pg" and not has_reward_signal(rewards.reshape(-1), groups):
            # no fit prompt has samples of different rewards: nothing to learn, so the probe scores
            # every sample alike (uniform choice, pass@1), and the run says so
            probe = QProbe.constant(x_fit.shape[1]).to(ctx.device)
            out.setdefault("no_reward_signal", []).append(name)
        else:
            probe = fit_probe(x_fit, rewards.reshape(-1), groups, objective, lr=cfg.probe_lr,
                              epochs=cfg.probe_epochs, batch_size=cfg.probe_batch, weight_decay=cfg.weight_decay,
                              seed=seed, device=ctx.device, progress=False)

        def score(s: SampleSet, probe=probe) -> torch.Tensor:
            p, n = s.rewards.shape
            return probe.score(s.features.reshape(p * n, -1).to(ctx.device)).cpu().view(p, n)

        table = evaluate_probe(score(test), test.rewards, cfg.ks, cfg.betas)
        out["baseline"], out["pass_at_k"] = table["baseline"], table["pass_at_k"]
        q_val = score(val)
        chosen = {k: tune_beta(q_val, val.rewards, k, cfg.betas, resamples=cfg.beta_resamples, seed=seed)
                  for k in cfg.ks}
        out["probes"][name] = {**table["expected_return"],
                               TUNED: {k: table["expected_return"][chosen[k].chosen][k] for k in cfg.ks}}
        out["tuned_beta"][name] = {k: chosen[k].chosen for k in cfg.ks}
        out["beta_stability"][name] = {k: chosen[k].stability for k in cfg.ks}
    return out
