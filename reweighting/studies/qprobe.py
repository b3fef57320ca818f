"""Q-probe on a tiny GPT that does two-digit addition (docs/methods/qprobe.md).

A small GPT is trained here on ``"37+48=85;Y"``: right answers followed by the verdict ``Y``, and
wrong answers (never learned as answers) followed by ``N``. A large pretrained LM knows a good deal
about whether its own answers are right; the verdict task gives this small one some of that
knowledge in its residual stream. Its completions are sampled at a high temperature, so that only
about a quarter are right while the best of several usually is: the regime where choosing among k
samples pays. For disjoint training and test prompts (neither seen by the GPT), completions are
rewarded 1 when the answer is exact and embedded by the GPT's last hidden state at the last
completion token. Linear probes are fitted with ``L_Q``, ``L_CE`` and ``L_PG`` and evaluated by the
exact chunked expected return of ``softmax(Q / beta)`` selection among k samples, against pass@1
(one sample) and pass@k (an oracle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from . import Baseline, Study, StudyContext, StudyOutcome, check_baseline, compare, decide

PROMPT_LEN = 6  # "37+48="
MAX_NEW = 4  # up to three digits and ";"
WIDTH = PROMPT_LEN + MAX_NEW + 1  # and the verdict "Y" / "N" after ";"
ALPHABET = "0123456789;+=YN"
STOP = ALPHABET.index(";")
ANSWER_TOKENS = 11  # answers are sampled from the digits and ";", the first 11 symbols
OBJECTIVES = {"L_Q": "mse", "L_CE": "bce", "L_PG": "pg"}
TUNED = "tuned"  # the key of each probe's results at its own beta (chosen per k)
# The base model is healthy for this study when choosing can pay: pass@k minus pass@1 on the test
# prompts (the oracle's headroom over one sample) reaches this. A model that is never right, or
# always right, leaves nothing to choose and makes every comparison of probes meaningless.
HEALTHY_HEADROOM = 0.1


def baseline_health(pass_at_1: list[float], pass_at_k: list[float], k: int, bar: float = HEALTHY_HEADROOM) -> Baseline:
    """The health check: mean over seeds of ``pass@k - pass@1`` against ``bar``."""
    headroom = sum(b - a for a, b in zip(pass_at_1, pass_at_k)) / len(pass_at_1)
    return check_baseline(f"pass@{k} - pass@1 on the test prompts (room for a choice to pay)", headroom, bar)


@dataclass(frozen=True)
class ArithmeticConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    lm_lr: float = 3e-3
    lm_batch: int = 256
    lm_max_steps: int = 3000
    check_every: int = 10
    target_accuracy: float = 0.95  # sampled accuracy (temperature 1) at which the base model stops training
    # Sampling temperature of the completions: high, so that a model that knows the answer still
    # writes it in only about a quarter of its samples (the regime where choosing among k pays).
    temperature: float = 3.5
    train_prompts: int = 400
    train_samples: int = 16
    test_prompts: int = 200
    test_samples: int = 48
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 48)
    # Up to 10 (near a uniform pick, pass@1): with the grid ending at 1, every seed chose beta = 1 at
    # k >= 16, the end of the grid, so the tuned result at large k was capped by the grid, not the probe.
    betas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    # Selection temperature of the headline metric; None: each probe's own, chosen among ``betas`` by
    # its expected return on the training prompts (k = train_samples). The scale of Q differs between
    # objectives (L_Q regresses a 0/1 reward, L_PG learns logits at temperature 1), so one fixed beta
    # would favour some; per-table results for every beta are kept in the details.
    beta: float | None = None
    # The paper's lr of 5e-5 is tuned for ~100x more samples; on these few thousand it barely moves
    # the probe in 150 epochs, so the study uses a larger one (same optimiser, epochs and batch).
    probe_lr: float = 1e-3
    probe_epochs: int = 150
    probe_batch: int = 1000
    weight_decay: float = 0.0


FULL = ArithmeticConfig()
QUICK = replace(FULL, train_prompts=200, test_prompts=100, probe_epochs=100)
SMOKE = replace(FULL, dim=32, heads=2, lm_max_steps=40, check_every=20, train_prompts=24,
                train_samples=8, test_prompts=12, test_samples=8, ks=(1, 2, 8), betas=(0.0, 0.1), probe_epochs=5)


def _encode(pairs: torch.Tensor, answers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows ``"a+b=c;V"`` (``V`` = Y when ``c = a + b``, else N) and the position of each ``V``;
    prompts only (``"a+b="``) when ``answers`` is None."""
    rows, verdict_at = [], []
    for i, (a, b) in enumerate(pairs.tolist()):
        if answers is None:
            text = f"{a}+{b}="
        else:
            c = int(answers[i])
            text = f"{a}+{b}={c};" + ("Y" if c == a + b else "N")
            verdict_at.append(len(text) - 1)
        rows.append([ALPHABET.index(ch) for ch in text.ljust(WIDTH, ";")])
    tokens = torch.tensor(rows)
    return (tokens[:, :PROMPT_LEN] if answers is None else tokens), torch.tensor(verdict_at, dtype=torch.long)


def _hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    """The last transformer block's output (the residual stream before the final LayerNorm)."""
    x = model.tok(tokens) + model.pos(torch.arange(tokens.shape[1], device=tokens.device))
    for block in model.blocks:
        x = block(x)
    return x


@torch.no_grad()
def _sample(model, pairs: torch.Tensor, n: int, generator: torch.Generator, device,
            temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """n completions per prompt at ``temperature``, their 0/1 rewards and their features."""
    prompts = _encode(pairs)[0].repeat_interleave(n, dim=0).to(device)
    x = prompts
    for _ in range(MAX_NEW):
        logits = model(x)[:, -1].float() / temperature
        logits[:, ANSWER_TOKENS:] = -torch.inf  # answers are written with digits and ";" only
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        x = torch.cat([x, nxt], dim=1)
    completion = x[:, PROMPT_LEN:].cpu()
    is_stop = completion == STOP
    has_stop = is_stop.any(dim=1)
    last = torch.full_like(has_stop, MAX_NEW - 1, dtype=torch.long)
    stop_at = torch.where(has_stop, is_stop.float().argmax(dim=1), last)
    # The feature is the state at the completion's last token (";", or the last one drawn), which has
    # read the whole answer.
    states = _hidden(model, x)
    feats = states[torch.arange(x.shape[0]), PROMPT_LEN + stop_at.to(device)].float().cpu()
    answers = (pairs[:, 0] + pairs[:, 1]).repeat_interleave(n)
    rewards = torch.zeros(x.shape[0])
    for i, (row, ok, end) in enumerate(zip(completion.tolist(), has_stop.tolist(), stop_at.tolist())):
        if ok and end > 0:
            rewards[i] = float("".join(ALPHABET[t] for t in row[:end]) == str(int(answers[i])))
    return {"features": feats, "rewards": rewards.view(len(pairs), n)}


def _train_lm(cfg: ArithmeticConfig, train_pairs: torch.Tensor, check_pairs: torch.Tensor, seed: int, device,
              ctx: StudyContext) -> tuple[torch.nn.Module, int, float, float]:
    """Train on answers and verdicts, stopping once sampled accuracy on held-out prompts reaches the target.

    Half of each batch is right answers ``"a+b=c;Y"`` (loss on the answer, ";" and "Y"), half is
    wrong answers ``"a+b=c';N"`` (loss on "N" only: the model never learns to write them). A large
    pretrained LM knows a good deal about whether its own answers are right; the verdict task gives
    this small one some of that knowledge, in the state at ";" that the probe reads.
    """
    from .lm import GPTConfig, TinyGPT

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=len(ALPHABET), context=PROMPT_LEN + MAX_NEW, dim=cfg.dim,
                              layers=cfg.layers, heads=cfg.heads)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr)
    accuracy, step, losses = 0.0, 0, []
    half = cfg.lm_batch // 2
    rows = torch.arange(cfg.lm_batch)
    for step in ctx.progress(range(1, cfg.lm_max_steps + 1), desc=f"train GPT on addition (seed {seed})"):
        pairs = train_pairs[torch.randint(len(train_pairs), (cfg.lm_batch,), generator=g)]
        right = pairs.sum(dim=1)
        sign = torch.randint(0, 2, (cfg.lm_batch,), generator=g) * 2 - 1
        offset = torch.randint(1, 12, (cfg.lm_batch,), generator=g) * sign
        # Wrong answers near the right one (the usual slip) or anywhere in range.
        anywhere = torch.randint(0, 199, (cfg.lm_batch,), generator=g)
        near = torch.rand(cfg.lm_batch, generator=g) < 0.5
        wrong = torch.where(near, (right + offset).clamp(min=0), anywhere)
        answers = torch.cat([right[:half], wrong[half:]])
        answers[half:] = torch.where(answers[half:] == right[half:], right[half:] + 1, answers[half:])
        batch, verdict_at = _encode(pairs, answers)
        token_loss = model.token_losses(batch.to(device))  # position t predicts token t + 1
        weight = torch.zeros_like(token_loss)
        for i in range(half):  # the answer, ";" and the verdict; never the random operands
            weight[i, PROMPT_LEN - 1: verdict_at[i]] = 1.0
        weight[rows[half:], verdict_at[half:] - 1] = 1.0
        loss = (token_loss * weight).sum() / weight.sum()
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.check_every == 0:
            model.eval()
            accuracy = float(_sample(model, check_pairs, 4, g, device)["rewards"].mean())
            model.train()
            if accuracy >= cfg.target_accuracy:
                break
    return model.eval(), step, accuracy, sum(losses[-10:]) / len(losses[-10:])


def fit_and_evaluate(cfg, train_features: torch.Tensor, train_rewards: torch.Tensor, test_features: torch.Tensor,
                     test_rewards: torch.Tensor, seed: int, ctx: StudyContext) -> dict:
    """Fit one probe per objective and evaluate it on the test prompts (shared with ``qprobe-smollm2``).

    Rewards are ``[prompts, k]``; features are ``[prompts * k, D]`` or ``[prompts, k, D]``. Each
    probe's tuned beta is the one of ``cfg.betas`` with the highest expected return on the training
    prompts at that k (as the paper tunes beta on training data; for a k above the number of training
    samples per prompt, the beta chosen at that number). Returns ``baseline``, ``pass_at_k``, ``probes``
    (per beta and ``TUNED``, each ``{k: expected return}``) and ``tuned_beta`` (``{probe: {k: beta}}``).
    """
    from ..qprobe import evaluate_probe, expected_return, fit_probe

    n_train, k_train = train_rewards.shape
    n_test, k_test = test_rewards.shape
    train_features = train_features.reshape(n_train * k_train, -1)
    test_features = test_features.reshape(n_test * k_test, -1)
    groups = torch.arange(n_train).repeat_interleave(k_train)
    out: dict = {"probes": {}, "tuned_beta": {}}
    for name, objective in OBJECTIVES.items():
        probe = fit_probe(train_features, train_rewards.reshape(-1), groups, objective, lr=cfg.probe_lr,
                          epochs=cfg.probe_epochs, batch_size=cfg.probe_batch, weight_decay=cfg.weight_decay,
                          seed=seed, device=ctx.device, progress=ctx.show_progress)
        q = probe.score(test_features.to(ctx.device)).cpu().view(n_test, k_test)
        table = evaluate_probe(q, test_rewards, cfg.ks, cfg.betas)
        out["baseline"], out["pass_at_k"] = table["baseline"], table["pass_at_k"]
        q_train = probe.score(train_features.to(ctx.device)).cpu().view(n_train, k_train)
        chosen = {}
        for k in cfg.ks:
            k_fit = min(k, k_train)
            on_train = {b: float(expected_return(q_train, train_rewards, k_fit, b)) for b in cfg.betas}
            chosen[k] = max(cfg.betas, key=lambda b, on_train=on_train: on_train[b])  # first best on ties
        tuned = {k: table["expected_return"][chosen[k]][k] for k in cfg.ks}
        out["probes"][name] = {**table["expected_return"], TUNED: tuned}
        out["tuned_beta"][name] = chosen
    return out


def _one_seed(cfg: ArithmeticConfig, seed: int, ctx: StudyContext) -> dict:
    device = ctx.device
    g = torch.Generator().manual_seed(1000 + seed)
    pairs = torch.cartesian_prod(torch.arange(10, 100), torch.arange(10, 100))
    pairs = pairs[torch.randperm(len(pairs), generator=g)]
    test = pairs[: cfg.test_prompts]
    probe_train = pairs[cfg.test_prompts: cfg.test_prompts + cfg.train_prompts]
    check = pairs[cfg.test_prompts + cfg.train_prompts: cfg.test_prompts + cfg.train_prompts + 200]
    # The base model sees none of the prompts the probes are trained or tested on, so that both sets
    # are equally new to it (features of memorised prompts would differ from those of new ones).
    lm_pairs = pairs[cfg.test_prompts + cfg.train_prompts + 200:]
    model, steps, accuracy, lm_loss = _train_lm(cfg, lm_pairs, check, seed, device, ctx)

    train = _sample(model, probe_train, cfg.train_samples, g, device, cfg.temperature)
    held = _sample(model, test, cfg.test_samples, g, device, cfg.temperature)
    out = {"lm_steps": steps, "lm_check_accuracy": accuracy, "lm_final_loss": lm_loss,
           "train_mean_reward": float(train["rewards"].mean())}
    out.update(fit_and_evaluate(cfg, train["features"], train["rewards"], held["features"], held["rewards"], seed, ctx))
    return out


def _beta_key(cfg):
    return TUNED if cfg.beta is None else cfg.beta


def _beta_label(cfg) -> str:
    return "beta chosen per probe and k on its training prompts" if cfg.beta is None else f"beta = {cfg.beta}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def _plots(cfg: ArithmeticConfig, runs: list[dict], ctx: StudyContext, prefix: str) -> list[str]:
    from .report import new_figure, save_figure

    names = []
    fig, ax = new_figure(6.4, 4.2)
    ks = list(cfg.ks)
    for name in OBJECTIVES:
        stats = [_mean_std([r["probes"][name][_beta_key(cfg)][k] for r in runs]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name)
    sky = [_mean_std([r["pass_at_k"][k] for r in runs])[0] for k in ks]
    ax.plot(ks, sky, "k--", label="pass@k (oracle)")
    ax.axhline(_mean_std([r["baseline"] for r in runs])[0], color="grey", ls=":", label="pass@1 (one sample)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (samples to choose from)")
    ax.set_ylabel("expected reward of the chosen sample")
    ax.set_title(f"{prefix}: choosing among k samples\n({_beta_label(cfg)})", fontsize=10)
    ax.legend(fontsize=8)
    names.append(save_figure(fig, ctx.out_dir / "expected_return_vs_k.png"))

    fig, ax = new_figure(6.4, 4.2)
    betas = list(cfg.betas)
    k = max(cfg.ks)
    for name in OBJECTIVES:
        stats = [_mean_std([r["probes"][name][b][k] for r in runs]) for b in betas]
        ax.errorbar(range(len(betas)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=name)
    ax.axhline(_mean_std([r["baseline"] for r in runs])[0], color="grey", ls=":", label="pass@1")
    ax.set_xticks(range(len(betas)))
    ax.set_xticklabels([f"{b:g}" + (" (argmax)" if b == 0 else "") for b in betas])
    ax.set_xlabel("beta")
    ax.set_ylabel(f"expected reward (k = {k})")
    ax.set_title(f"{prefix}: effect of the selection temperature")
    ax.legend(fontsize=8)
    names.append(save_figure(fig, ctx.out_dir / "expected_return_vs_beta.png"))
    return names


def claim_parts(cfg, runs: list[dict]) -> list:
    """The claim's parts, each paired by seed: every probe beats pass@1 at the largest k, L_PG beats
    L_CE and L_Q there, and L_PG keeps improving with k: at every step of ``cfg.ks`` from the middle
    k to the largest."""
    k_max, beta = max(cfg.ks), _beta_key(cfg)
    k_mid = sorted(cfg.ks)[len(cfg.ks) // 2]

    def at(name: str, k: int) -> list[float]:
        return [r["probes"][name][beta][k] for r in runs]

    base = [r["baseline"] for r in runs]
    parts = [compare(f"{name} > pass@1 (k={k_max})", at(name, k_max), base) for name in OBJECTIVES]
    parts += [compare(f"L_PG > {other} (k={k_max})", at("L_PG", k_max), at(other, k_max)) for other in ("L_CE", "L_Q")]
    # "keeps improving": every step of the k grid from the middle k up, each paired by seed
    upper = [k for k in sorted(cfg.ks) if k >= k_mid]
    parts += [compare(f"L_PG improves from k={lo} to k={hi}", at("L_PG", hi), at("L_PG", lo))
              for lo, hi in zip(upper, upper[1:])]
    return parts


def summarize_runs(cfg, runs: list[dict], ctx: StudyContext, prefix: str, extra_config: dict) -> StudyOutcome:
    """Per-seed metric at the largest k and ``cfg.beta``, the claim's verdict, tables and plots."""
    k_max, beta = max(cfg.ks), _beta_key(cfg)
    methods = {"pass@1": [r["baseline"] for r in runs]}
    for name in OBJECTIVES:
        methods[name] = [r["probes"][name][beta][k_max] for r in runs]
    methods[f"pass@{k_max} (oracle)"] = [r["pass_at_k"][k_max] for r in runs]
    mean = {name: _mean_std(v)[0] for name, v in methods.items()}
    baseline = baseline_health(methods["pass@1"], methods[f"pass@{k_max} (oracle)"], k_max)
    parts = claim_parts(cfg, runs)
    verdict = decide(parts, baseline)
    by_k = {name: {k: _mean_std([r["probes"][name][beta][k] for r in runs]) for k in cfg.ks} for name in OBJECTIVES}
    lines = [f"Expected reward of selecting one of k samples by `softmax(Q / beta)`, {_beta_label(cfg)} "
             f"(mean over {len(runs)} seed(s)):", "",
             "| k | pass@1 | " + " | ".join(OBJECTIVES) + " | pass@k |", "|---" * (len(OBJECTIVES) + 3) + "|"]
    for k in cfg.ks:
        sky = _mean_std([r["pass_at_k"][k] for r in runs])[0]
        lines.append(f"| {k} | {mean['pass@1']:.3f} | " + " | ".join(f"{by_k[n][k][0]:.3f}" for n in OBJECTIVES)
                     + f" | {sky:.3f} |")
    lines += ["", "| part of the claim | verdict | margin | noise | seeds |", "|---|---|---|---|---|"]
    for part in parts:
        noise = f"{part.noise:.4f}" if part.noise is not None else "n/a (1 seed)"
        lines.append(f"| {part.name} | {part.verdict} | {part.margin:+.4f} | {noise} | {part.n} |")
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the whole claim: **{verdict}**."]
    failed = [p.name for p in parts if p.verdict != "holds"]
    if failed and baseline.healthy:
        lines.append(f"Parts that did not hold (or could not be told from the noise): {', '.join(failed)}.")
    peaks = {n: max(cfg.ks, key=lambda k, n=n: by_k[n][k][0]) for n in OBJECTIVES}
    if any(peak < k_max for peak in peaks.values()):
        lines.append(
            "Expected reward peaks at k = " + ", ".join(f"{peaks[n]} ({n})" for n in OBJECTIVES)
            + f" and is lower at k = {k_max}: with more candidates, the chance grows that some wrong "
            "completion gets a higher Q than every right one, so a probe's rare large errors start to "
            "decide the choice (the paper's probes on a 7B model kept improving up to k = 48).")
    plots = _plots(cfg, runs, ctx, prefix)
    details = {"per_seed": runs,
               "expected_return_by_k": {n: {k: v[0] for k, v in d.items()} for n, d in by_k.items()}}
    config = {**asdict(cfg), **extra_config, "healthy_headroom": HEALTHY_HEADROOM}
    return StudyOutcome(methods=methods, holds=verdict == "holds", config=config, summary="\n".join(lines),
                        details=details, plots=plots, parts=parts, baseline=baseline)


def run_arithmetic(cfg: ArithmeticConfig, ctx: StudyContext) -> StudyOutcome:
    """The whole study for one configuration (``FULL``, ``QUICK`` or ``SMOKE``)."""
    runs = [_one_seed(cfg, seed, ctx) for seed in ctx.progress(ctx.seeds, desc="qprobe seeds")]
    extra = {"lm_steps": [r["lm_steps"] for r in runs], "train_mean_reward": [r["train_mean_reward"] for r in runs],
             "lm_check_accuracy": [r["lm_check_accuracy"] for r in runs],
             "lm_final_loss": [r["lm_final_loss"] for r in runs], "tuned_beta": [r["tuned_beta"] for r in runs]}
    return summarize_runs(cfg, runs, ctx, "tiny GPT, addition", extra)


def _run(ctx: StudyContext) -> StudyOutcome:
    return run_arithmetic(QUICK if ctx.quick else FULL, ctx)


STUDY = Study(
    name="qprobe",
    claim=("Choosing among k samples with a Q-probe beats one sample; L_PG beats L_CE and L_Q and keeps "
           "improving with k (Li et al., 2024)"),
    metric="expected reward at the largest k (beta per probe and k, chosen on training prompts)",
    lower_is_better=False,
    run=_run,
    seeds=5,
    cost=380,
    quick_seeds=1,  # one seed keeps --quick under two minutes on two cores
    description="Q-probe selection on a tiny GPT's sampled additions: L_Q, L_CE, L_PG vs pass@1 and pass@k",
)
