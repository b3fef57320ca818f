"""The verdict, tables and figures of a Q-probe study from its replicates (one dict per evidence seed,
as ``qprobe_eval.fit_and_evaluate`` returns them).

The headline metric of a probe is its expected reward at the largest k with its beta chosen on the
validation prompts; the paper's fixed beta (0.1) is reported beside it. The shuffled-reward control's
two sides are reported: the declared part (it must not beat pass@1) and, beside it, whether it is
also not worse than pass@1 (it need not be: see the protocols).
"""

from __future__ import annotations

import math

from . import StudyContext, StudyOutcome, declared_compare
from .protocol import Protocol
from .qprobe_eval import CONTROL, OBJECTIVES, PAPER_BETA, TUNED, _steps, part_names
from .stats import Baseline, check_baseline, compare, decide

__all__ = ["HEALTHY_HEADROOM", "baseline_health", "claim_parts", "summarize_runs"]

# The base model is healthy for a study when choosing can pay: pass@k minus pass@1 on the test
# prompts (the oracle's headroom over one sample) reaches this. A model that is never right, or
# always right, leaves nothing to choose and makes every comparison of probes meaningless.
HEALTHY_HEADROOM = 0.1


def baseline_health(pass_at_1: list[float], pass_at_k: list[float], k: int, bar: float = HEALTHY_HEADROOM) -> Baseline:
    """The health check: mean over seeds of ``pass@k - pass@1`` against ``bar``."""
    headroom = sum(b - a for a, b in zip(pass_at_1, pass_at_k)) / len(pass_at_1)
    return check_baseline(f"pass@{k} - pass@1 on the test prompts (room for a choice to pay)", headroom, bar)


def _at(runs: list[dict], name: str, k: int, beta=TUNED) -> list[float]:
    return [r["probes"][name][beta][k] for r in runs]


def claim_parts(protocol: Protocol, ks, runs: list[dict]) -> list:
    """The declared parts, each paired by seed: every probe beats pass@1 at the largest k, L_PG beats
    L_CE and L_Q there, L_PG improves at every step of the k grid from the middle k up, and the
    shuffled-reward control does not beat pass@1 by more than its tolerance."""
    k = max(ks)
    base = [r["baseline"] for r in runs]
    names = part_names(ks)
    values = [(_at(runs, n, k), base) for n in OBJECTIVES]
    values += [(_at(runs, "L_PG", k), _at(runs, other, k)) for other in ("L_CE", "L_Q")]
    values += [(_at(runs, "L_PG", hi), _at(runs, "L_PG", lo)) for lo, hi in _steps(ks)]
    values.append((base, _at(runs, CONTROL, k)))
    return [declared_compare(protocol, name, a, b) for name, (a, b) in zip(names, values)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _plots(cfg, runs: list[dict], ctx: StudyContext, prefix: str) -> list[str]:
    from .report import new_figure, save_figure

    def mean_std(v: list[float]) -> tuple[float, float]:
        m = _mean(v)
        return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)

    names, ks = [], list(cfg.ks)
    fig, ax = new_figure(6.4, 4.2)
    for name in [*OBJECTIVES, CONTROL]:
        stats = [mean_std(_at(runs, name, k)) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name)
    ax.plot(ks, [_mean([r["pass_at_k"][k] for r in runs]) for k in ks], "k--", label="pass@k (oracle)")
    ax.axhline(_mean([r["baseline"] for r in runs]), color="grey", ls=":", label="pass@1 (one sample)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (samples to choose from)")
    ax.set_ylabel("expected reward of the chosen sample")
    ax.set_title(f"{prefix}: choosing among k samples\n(beta chosen on validation prompts)", fontsize=10)
    ax.legend(fontsize=8)
    names.append(save_figure(fig, ctx.out_dir / "expected_return_vs_k.png"))

    fig, ax = new_figure(6.4, 4.2)
    betas, k = list(cfg.betas), max(cfg.ks)
    for name in [*OBJECTIVES, CONTROL]:
        stats = [mean_std(_at(runs, name, k, b)) for b in betas]
        ax.errorbar(range(len(betas)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=name)
    ax.axhline(_mean([r["baseline"] for r in runs]), color="grey", ls=":", label="pass@1")
    ax.set_xticks(range(len(betas)))
    ax.set_xticklabels([f"{b:g}" + (" (argmax)" if b == 0 else "") for b in betas])
    ax.set_xlabel("beta")
    ax.set_ylabel(f"expected reward (k = {k})")
    ax.set_title(f"{prefix}: effect of the selection temperature")
    ax.legend(fontsize=8)
    names.append(save_figure(fig, ctx.out_dir / "expected_return_vs_beta.png"))
    return names


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def summarize_runs(cfg, protocol: Protocol, runs: list[dict], ctx: StudyContext, prefix: str, extra_config: dict,
                   extra_details: dict | None = None) -> StudyOutcome:
    """Per-seed metric at the largest k, the claim's verdict, tables and plots."""
    k_max = max(cfg.ks)
    base = [r["baseline"] for r in runs]
    oracle = [r["pass_at_k"][k_max] for r in runs]
    methods = {"pass@1": base}
    for name in [*OBJECTIVES, CONTROL]:
        methods[name] = _at(runs, name, k_max)
    for name in [*OBJECTIVES, CONTROL]:
        methods[f"{name} (beta {PAPER_BETA})"] = _at(runs, name, k_max, PAPER_BETA)
    methods[f"pass@{k_max} (oracle)"] = oracle
    baseline = baseline_health(base, oracle, k_max)
    parts = claim_parts(protocol, cfg.ks, runs)
    verdict = decide(parts, baseline)
    probes = [*OBJECTIVES, CONTROL]
    lines = [f"Expected reward of selecting one of k samples by `softmax(Q / beta)` on the test prompts, beta "
             f"chosen per probe and k on held-out validation prompts (mean over {len(runs)} seeds, each "
             "with its own questions split and completions):", "",
             "| k | pass@1 | " + " | ".join(probes) + " | pass@k |", "|---" * (len(probes) + 3) + "|"]
    for k in cfg.ks:
        lines.append(f"| {k} | {_mean(base):.3f} | " + " | ".join(f"{_mean(_at(runs, n, k)):.3f}" for n in probes)
                     + f" | {_mean([r['pass_at_k'][k] for r in runs]):.3f} |")
    lines.append(f"| {k_max}, beta {PAPER_BETA} (paper) | {_mean(base):.3f} | "
                 + " | ".join(f"{_mean(_at(runs, n, k_max, PAPER_BETA)):.3f}" for n in probes)
                 + f" | {_mean(oracle):.3f} |")
    # None where a seed had one validation prompt (no resampling can move that choice)
    stability = {n: {k: _mean([v for r in runs if (v := r["beta_stability"][n][k]) is not None] or [math.nan])
                     for k in cfg.ks} for n in probes}
    chosen = {n: [r["tuned_beta"][n][k_max] for r in runs] for n in probes}
    lines += ["", f"Beta chosen at k = {k_max} per seed (stability: share of bootstrap resamples of the "
              "validation prompts that pick the same beta, mean over seeds): "
              + "; ".join(f"{n} {chosen[n]} ({stability[n][k_max]:.2f})" for n in probes) + "."]
    lines += ["", "| part of the claim | verdict | margin | noise | MDE | expected / tolerance | seeds |",
              "|---|---|---|---|---|---|---|"]
    for p in parts:
        target = p.tolerance if p.kind == "not worse" else p.expected
        lines.append(f"| {p.name} | {p.verdict} | {p.margin:+.4f} | {_fmt(p.noise)} | {_fmt(p.mde)} | "
                     f"{_fmt(target, '.3f')} | {p.n} |")
    control = parts[-1]
    other_side = compare(f"shuffled-reward L_PG not worse than pass@1 (k={k_max}; reported, not decided)",
                         _at(runs, CONTROL, k_max), base, kind="not worse", tolerance=control.tolerance)
    lines += ["", f"The control's other side, reported: {other_side.name}: {other_side.verdict} (margin "
              f"{other_side.margin:+.4f}, noise {_fmt(other_side.noise)}); at the paper's beta the shuffled-reward "
              f"probe scores {_mean(_at(runs, CONTROL, k_max, PAPER_BETA)):.3f} against pass@1 {_mean(base):.3f}."]
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the whole claim: **{verdict}**."]
    failed = [p.name for p in parts if p.verdict != "holds"]
    if failed and baseline.healthy:
        lines.append(f"Parts that did not hold (or could not be told from the noise): {', '.join(failed)}.")
    plots = _plots(cfg, runs, ctx, prefix)
    details = {"per_seed": runs, "beta_stability_mean": stability, "control_other_side": other_side.as_dict(),
               "tuned_beta_at_k_max": chosen,
               "expected_return_by_k": {n: {k: _mean(_at(runs, n, k)) for k in cfg.ks} for n in probes},
               "expected_return_paper_beta": {n: {k: _mean(_at(runs, n, k, PAPER_BETA)) for k in cfg.ks}
                                              for n in probes},
               **(extra_details or {})}
    config = {**extra_config, "healthy_headroom": HEALTHY_HEADROOM}
    return StudyOutcome(methods=methods, holds=verdict == "holds", config=config, summary="\n".join(lines),
                        details=details, plots=plots, parts=parts, baseline=baseline)
