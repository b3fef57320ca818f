"""The ``noisy-labels`` study's report: its markdown summary and its two figures."""

from __future__ import annotations

from .noisy_labels_run import CLEAN_CE
from .stats import compare

OTHERS = ("FL", "RW", "DWS", "CE")
ROWS = ("CE", "FL", "RW", "DWS", "RENT")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _points(x: float | None, sign: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _difference_cell(methods: dict, noise: str, other: str) -> str:
    a, b = methods[f"{noise} / RENT"], methods[f"{noise} / {other}"]
    part = compare("", a, b)
    ahead = sum(x > y for x, y in zip(a, b))
    noise_text = f" ± {100 * part.noise:.1f}" if part.noise is not None else ""
    return f"{100 * part.margin:+.1f}{noise_text} ({ahead}/{len(a)})"


def summary(*, selected, final, epochs, noises, parts, final_parts, baseline, verdict, selection, warmup, errors,
            true_t, left_out=()) -> str:
    """The study's markdown summary (see :func:`reweighting.studies.noisy_labels.run` for the inputs)."""
    lines = [
        "Claim as the paper states it: RENT outperforms the existing ways of using T (forward correction FL and "
        "reweighting RW here) and beats CE under heavy noise. Every method trains from scratch; each reports the "
        "clean test accuracy at its epoch with the best noisy-validation accuracy. Parts, paired by seed (margin "
        "in accuracy points, positive favours RENT; noise = half-width of the paired 95% t-interval; MDE = effect "
        "found with 80% power; expected = the paper's effect scaled to this setting):", "",
        "| part | verdict | margin | noise | MDE | expected | seeds |", "|---|---|---|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.verdict} | {_points(p.margin)} | {_points(p.noise, False)} | "
                     f"{_points(p.mde, False)} | {_points(p.expected, False)} | {p.n} |")
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the whole claim: **{verdict}**.", "",
              "The same parts at the final epoch (not the metric; beside it to show what memorisation does):", "",
              "| part | verdict | margin | noise |", "|---|---|---|---|"]
    for p in final_parts:
        lines.append(f"| {p.name} | {p.verdict} | {_points(p.margin)} | {_points(p.noise, False)} |")
    scores = ", ".join(f"{k}: {100 * v:.2f}" for k, v in selection.scores.items())
    lines += ["", f"Weight decay chosen on {selection.seeds} selection seed(s): **{selection.chosen}** (mean "
              f"noisy-validation accuracy, %: {scores}); "
              + (f"the same choice in {100 * selection.stability:.0f}% of {selection.resamples} bootstrap resamples "
                 "of the selection seeds." if selection.stability is not None else "one selection seed: no "
                 "stability figure."), "",
              "Per setting, RENT minus each method (points, selected epoch; mean ± noise over seeds; RENT ahead in "
              "k of n seeds). Settings share seeds, so these rows are not independent of one another:", "",
              "| noise | " + " | ".join(f"vs {o}" for o in OTHERS) + " |", "|---" * (len(OTHERS) + 1) + "|"]
    for noise in noises:
        lines.append(f"| {noise} | " + " | ".join(_difference_cell(selected, noise, o) for o in OTHERS) + " |")
    rows = list(ROWS) + [f"{m} (true T)" for m in true_t if f"{noises[0]} / {m} (true T)" in selected]
    clean = _mean(selected[CLEAN_CE])
    lines += ["", f"Clean test accuracy (%), selected epoch / final epoch, mean over seeds; reference: CE on the clean "
              f"labels {100 * clean:.1f} / {100 * _mean(final[CLEAN_CE]):.1f}. Warm-up = the CE model T is "
              "estimated from:", "", "| noise | warm-up | " + " | ".join(rows) + " |", "|---" * (len(rows) + 2) + "|"]
    for noise in noises:
        cells = [f"{100 * _mean(selected[f'{noise} / {n}']):.1f} / {100 * _mean(final[f'{noise} / {n}']):.1f}"
                 for n in rows]
        lines.append(f"| {noise} | {100 * _mean(warmup[noise]):.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Mean selected epoch: " + "; ".join(
        f"{noise}: " + ", ".join(f"{n} {_mean(epochs[f'{noise} / {n}']):.0f}" for n in ROWS) for noise in noises)
        + f"; {CLEAN_CE} {_mean(epochs[CLEAN_CE]):.0f}."]
    estimators = list(next(iter(errors.values())))
    lines += ["", "Error of the estimated T to the true T, sum|T_hat - T| / sum|T| (mean over seeds):", "",
              "| noise | " + " | ".join(estimators) + " |", "|---" * (len(estimators) + 1) + "|"]
    for noise in noises:
        lines.append(f"| {noise} | " + " | ".join(f"{_mean(errors[noise][e]):.3f}" for e in estimators) + " |")
    if left_out:
        lines += ["", "Left out: " + "; ".join(left_out) + "."]
    return "\n".join(lines)


def plot_curves(curves: dict, noises: list[str], path) -> str:
    """Clean test accuracy against epoch, mean over seeds, one panel per noise setting (dashed: CE on
    the clean labels)."""
    from .report import new_figure, save_figure

    fig, _ = new_figure(3.2 * len(noises) + 0.6, 3.6)
    fig.clf()
    clean = [_mean(col) for col in zip(*curves[CLEAN_CE]["test"])]
    for k, noise in enumerate(noises):
        ax = fig.add_subplot(1, len(noises), k + 1)
        for name in ROWS:
            ys = [100 * _mean(col) for col in zip(*curves[f"{noise} / {name}"]["test"])]
            ax.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1.3)
        ax.plot(range(1, len(clean) + 1), [100 * c for c in clean], "k--", linewidth=1.0, label=CLEAN_CE)
        ax.set_title(noise)
        ax.set_xlabel("epoch")
        if k == 0:
            ax.set_ylabel("clean test accuracy (%)")
        ax.set_ylim(60, 100)
        ax.grid(alpha=0.3)
    fig.axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(selected: dict, final: dict, noises: list[str], path) -> str:
    """Mean clean test accuracy per method and setting: filled at the selected epoch, hatched at the final."""
    import statistics

    from .report import new_figure, save_figure

    fig, ax = new_figure(max(6.0, 1.9 * len(noises) + 2), 4.2)
    width = 0.8 / len(ROWS)
    for k, name in enumerate(ROWS):
        xs = [i + (k - (len(ROWS) - 1) / 2) * width for i in range(len(noises))]
        values = [selected[f"{noise} / {name}"] for noise in noises]
        errs = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars = ax.bar(xs, [100 * _mean(v) for v in values], width, yerr=errs, capsize=2, label=name)
        ax.scatter(xs, [100 * _mean(final[f"{noise} / {name}"]) for noise in noises], marker="_", s=80,
                   color=bars.patches[0].get_facecolor(), zorder=3)
    ax.axhline(100 * _mean(selected[CLEAN_CE]), color="k", linestyle="--", linewidth=1, label=CLEAN_CE)
    ax.set_xticks(range(len(noises)))
    ax.set_xticklabels(noises)
    low = min(100 * min(v) for v in selected.values())
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("clean test accuracy (%), bars: selected epoch, ticks: final")
    ax.set_title("noisy digits: T estimated by anchor points")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    return save_figure(fig, path)
