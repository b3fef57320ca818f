"""Q-probe on a tiny GPT that does two-digit addition.

A small GPT is trained here on ``"37+48=85;Y"``: right answers followed by the verdict ``Y``, and
wrong answers (never learned as answers) followed by ``N``. A large pretrained LM knows a good deal
about whether its own answers are right; the verdict task gives this small one some of that
knowledge in its residual stream. Its completions are sampled at a high temperature, so that only
about a third are right while the best of several usually is: the regime where choosing among k
samples pays. Each seed draws its own questions, in four disjoint sets (the GPT's training
questions, and the probes' fit, validation and test questions, none seen by the GPT), trains its
own GPT from its own initialisation, and samples its own completions. Completions are rewarded 1
when the answer is exact and embedded by the GPT's last hidden state at the last completion token;
probes are fitted and scored as ``qprobe_eval`` describes (beta chosen on the validation questions,
a shuffled-reward control).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from . import Study, StudyContext, StudyOutcome, perturb_initial_weights
from .protocol import Protocol
from .qprobe_eval import OBJECTIVES, TUNED, SampleSet, declare_parts, fit_and_evaluate
from .qprobe_report import HEALTHY_HEADROOM, baseline_health, summarize_runs

__all__ = ["ArithmeticConfig", "FULL", "QUICK", "SMOKE", "PROTOCOL_FULL", "PROTOCOL_QUICK", "protocol_for",
           "run_arithmetic", "baseline_health", "OBJECTIVES", "TUNED", "HEALTHY_HEADROOM", "STUDY"]

PROMPT_LEN = 6  # "37+48="
MAX_NEW = 4  # up to three digits and ";"
WIDTH = PROMPT_LEN + MAX_NEW + 1  # and the verdict "Y" / "N" after ";"
ALPHABET = "0123456789;+=YN"
STOP = ALPHABET.index(";")
ANSWER_TOKENS = 11  # answers are sampled from the digits and ";", the first 11 symbols


@dataclass(frozen=True)
class ArithmeticConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    lm_lr: float = 3e-3
    lm_batch: int = 256
    lm_max_steps: int = 3000
    # Sampled accuracy is checked every 25 steps on 2 samples of each of 200 check questions (400
    # answers: standard error 0.011 at 0.95): checking every 10 steps on 4 samples was a quarter
    # of the GPT's training time.
    check_every: int = 25
    check_samples: int = 2
    target_accuracy: float = 0.95  # sampled accuracy (temperature 1) at which the base model stops training
    # Sampling temperature of the completions: high, so that a model that knows the answer still
    # writes it in only about a quarter of its samples (the regime where choosing among k pays).
    temperature: float = 3.5
    # The probes' questions, disjoint from each other and from the GPT's: fit (the probes learn from
    # them), validation (beta is chosen on them, at every k of the grid: 48 samples each) and test.
    train_prompts: int = 300
    train_samples: int = 16
    val_prompts: int = 100
    val_samples: int = 48
    test_prompts: int = 200
    test_samples: int = 48
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 48)
    # Up to 10 (near a uniform pick, pass@1) and from 0 (argmax); 0.1 is the paper's fixed beta.
    betas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    beta_resamples: int = 200  # bootstrap resamples of the validation prompts for beta's stability
    # The paper's lr of 5e-5 is tuned for ~100x more samples; on these few thousand it barely moves
    # the probe in 150 epochs, so the study uses a larger one (same optimiser, epochs and batch).
    probe_lr: float = 1e-3
    probe_epochs: int = 150
    probe_batch: int = 1000
    weight_decay: float = 0.0


FULL = ArithmeticConfig()
QUICK = replace(FULL, train_prompts=150, val_prompts=50, test_prompts=100, probe_epochs=100)
SMOKE = replace(FULL, dim=32, heads=2, lm_max_steps=40, check_every=20, train_prompts=24, train_samples=8,
                val_prompts=8, val_samples=8, test_prompts=12, test_samples=8, ks=(1, 2, 8), betas=(0.0, 0.1),
                probe_epochs=5, beta_resamples=20)


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


def _train_lm(cfg: ArithmeticConfig, train_pairs: torch.Tensor, check_pairs: torch.Tensor, seed: int,
              g: torch.Generator, device, ctx: StudyContext) -> tuple[torch.nn.Module, int, float, float]:
    """Train on answers and verdicts, stopping once sampled accuracy on held-out prompts reaches the target.

    Half of each batch is right answers ``"a+b=c;Y"`` (loss on the answer, ";" and "Y"), half is
    wrong answers ``"a+b=c';N"`` (loss on "N" only: the model never learns to write them). A large
    pretrained LM knows a good deal about whether its own answers are right; the verdict task gives
    this small one some of that knowledge, in the state at ";" that the probe reads.
    """
    from .lm import GPTConfig, TinyGPT

    torch.manual_seed(1_000_003 * seed + 3)  # the initialisation: a stream of the seed's own
    model = TinyGPT(GPTConfig(vocab_size=len(ALPHABET), context=PROMPT_LEN + MAX_NEW, dim=cfg.dim,
                              layers=cfg.layers, heads=cfg.heads)).to(device)
    perturb_initial_weights(model)
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
            accuracy = float(_sample(model, check_pairs, cfg.check_samples, g, device)["rewards"].mean())
            model.train()
            if accuracy >= cfg.target_accuracy:
                break
    return model.eval(), step, accuracy, sum(losses[-10:]) / len(losses[-10:])


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The seed's generators for its questions split and for its GPT's data and samples: streams of
    their own, so that no two seeds (evidence or selection) share one."""
    return torch.Generator().manual_seed(1_000_003 * seed + 11), torch.Generator().manual_seed(1_000_003 * seed + 29)


def _one_seed(cfg: ArithmeticConfig, seed: int, ctx: StudyContext) -> dict:
    device = ctx.device
    g_split, g = _generators(seed)
    pairs = torch.cartesian_prod(torch.arange(10, 100), torch.arange(10, 100))
    pairs = pairs[torch.randperm(len(pairs), generator=g_split)]
    sizes = {"test": cfg.test_prompts, "fit": cfg.train_prompts, "val": cfg.val_prompts, "check": 200}
    sets, at = {}, 0
    for name, size in sizes.items():
        sets[name], at = pairs[at: at + size], at + size
    # The GPT sees none of the probes' questions, so that fit, validation and test questions are all
    # equally new to it (features of memorised questions would differ from those of new ones).
    model, steps, accuracy, lm_loss = _train_lm(cfg, pairs[at:], sets["check"], seed, g, device, ctx)

    def draw(name: str, n: int) -> SampleSet:
        s = _sample(model, sets[name], n, g, device, cfg.temperature)
        return SampleSet(s["features"].view(len(sets[name]), n, -1), s["rewards"])

    fit, val, test = draw("fit", cfg.train_samples), draw("val", cfg.val_samples), draw("test", cfg.test_samples)
    out = {"lm_steps": steps, "lm_check_accuracy": accuracy, "lm_final_loss": lm_loss,
           "train_mean_reward": float(fit.rewards.mean())}
    out.update(fit_and_evaluate(cfg, fit, val, test, seed, ctx))
    return out


def run_arithmetic(cfg: ArithmeticConfig, ctx: StudyContext, protocol: Protocol | None = None) -> StudyOutcome:
    """The whole study for one configuration (``FULL``, ``QUICK`` or ``SMOKE``) on ``ctx.seeds``."""
    protocol = protocol or protocol_for(cfg, len(ctx.seeds), first_seed=ctx.seeds[0])
    runs = [_one_seed(cfg, seed, ctx) for seed in ctx.progress(ctx.seeds, desc="qprobe seeds")]
    extra = {**asdict(cfg), "lm_steps": [r["lm_steps"] for r in runs],
             "train_mean_reward": [r["train_mean_reward"] for r in runs],
             "lm_check_accuracy": [r["lm_check_accuracy"] for r in runs],
             "lm_final_loss": [r["lm_final_loss"] for r in runs]}
    return summarize_runs(cfg, protocol, runs, ctx, "tiny GPT, addition", extra)


CLAIM = ("Choosing among k samples with a Q-probe beats one sample; L_PG beats L_CE and L_Q and keeps "
         "improving with k (Li et al., 2024)")
METRIC = "expected reward at the largest k (beta per probe and k, chosen on held-out validation questions)"
# pass@48 - pass@1 on the test questions in the pilot (selection seed 1000, this protocol's regime
# but for the check every 10 steps on 4 samples): the paper's gains, as shares of its own headroom,
# are scaled by it.
PILOT_HEADROOM = 0.63
# The control's margin: the shuffled-reward probe may exceed pass@1 by at most 0.03 (a quarter of the
# smallest expected gain, L_Q's).
CONTROL_TOLERANCE = 0.03
COST = 750.0  # CPU seconds of the full run (measured)
SELECTION = (
    "beta: for each evidence seed, probe and k, the beta of the grid (0 to 10, 0 = argmax) with the best "
    "mean expected return over that seed's validation questions (at k, 48 samples each), by select_best "
    "with the validation questions as units; its stability (share of 200 bootstrap resamples of those "
    "questions that pick the same beta) is reported. Neither the probe's fit questions nor the test "
    "questions enter the choice.",
    "The paper's fixed beta (0.1) is reported beside the tuned one for every probe and k.",
    "No other setting is chosen in this protocol: the GPT's size, its stopping rule (sampled accuracy 0.95 "
    "at temperature 1 on 200 check questions), the sampling temperature (3.5) and the probe's learning "
    "rate (1e-3) are fixed as declared; the pilot that set the seed count ran on selection seeds.",
)
BASELINE = ("healthy when the mean over seeds of pass@48 - pass@1 on the test questions is >= 0.1 (room for a "
            "choice to pay; an untrained GPT, never right, and a GPT always right both fail it). The control "
            "part checks the pipeline: L_PG fitted on rewards shuffled within each fit question, scored like "
            "the others (beta tuned on the validation questions), must not beat pass@1 by more than the "
            "tolerance; a leak of the test rewards into Q or into the choice of beta would. Ten seeds: the "
            "pilot (this protocol on seeds 0-4) had a paired sd of 0.016-0.020 on L_PG against L_CE and L_Q, "
            "an MDE at 10 seeds of about 0.02, far below the 0.08-0.11 expected; the control's sd (0.10) "
            "would need about 90 seeds to reach its 0.03 tolerance, so it is labelled underpowered.")
REPLICATES = ("each evidence seed s draws its own split of the 8,100 questions a+b (a, b in 10..99) into test "
              "(200), fit (300), validation (100), check (200) and the GPT's training questions, its own GPT "
              "initialisation and data order, its own completions (temperature 3.5) and its own reward "
              "shuffle for the control; every stream is seeded from s alone. Parts are paired by seed.")
DEVIATIONS = (
    ("a 2-block, 64-wide GPT trained here on two-digit addition with a right/wrong verdict task, instead "
     "of Code-LLaMA-7B on MBPP", "a 7B model and code execution do not fit a 2-core CPU budget; the verdict "
     "task gives the small model some knowledge of its own correctness, which a large LM has"),
    ("sampling temperature 3.5", "so that about a third of the samples are right while the best of 48 "
     "nearly always is: the regime where choosing among k pays (the paper's pass@1 0.29, pass@48 0.76)"),
    ("probe learning rate 1e-3 instead of 5e-5", "the paper's rate suits ~100x more samples; on 4,800 it "
     "barely moves the probe in 150 epochs"),
    ("beta chosen per probe and k on held-out validation questions, beside the paper's fixed 0.1",
     "the scale of Q differs between objectives (L_Q regresses a 0/1 reward, L_PG learns logits), so one "
     "fixed beta favours some"),
    ("the control is one-sided (the shuffled-reward probe must not beat pass@1; that it is also not worse "
     "is reported, not decided)", "a probe without signal is not neutral here: the right completions of a "
     "question are one identical string with one feature vector, so a signal-free score ties them while it "
     "spreads the many different wrong answers, and a choice among the spread falls on a wrong one: in the "
     "pilot (selection seed 1000) the shuffled-reward probe scored 0.30 at k = 48 with its tuned beta, and "
     "0.00 at beta 0.1, against pass@1 0.375"),
    ("300 fit questions with 16 samples each", "the paper fits on about 100x more samples; a larger fit "
     "set costs sampling and fitting time outside the CPU budget"),
)


def protocol_for(cfg: ArithmeticConfig, seeds: int, first_seed: int = 0) -> Protocol:
    """The protocol of a run of ``cfg`` on ``seeds`` evidence seeds (see ``PROTOCOL_FULL``)."""
    return Protocol(claim=CLAIM, metric=METRIC, parts=declare_parts(cfg.ks, PILOT_HEADROOM, CONTROL_TOLERANCE),
                    seeds=seeds, first_seed=first_seed, selection_seeds=0,
                    settings=tuple(sorted(asdict(cfg).items())),
                    selection=SELECTION, baseline=BASELINE, replicates=REPLICATES, deviations=DEVIATIONS)


# 10 evidence seeds, sized from a pilot (the 5-seed run on seeds 0-4: paired sd 0.005-0.10 per part; at 10
# seeds the MDE of every part with an expected effect but the control is below it); the evidence seeds
# start at 100, past the pilot's.
PROTOCOL_FULL = protocol_for(FULL, 10, first_seed=100)
PROTOCOL_QUICK = protocol_for(QUICK, 1)


def _run(ctx: StudyContext) -> StudyOutcome:
    cfg, protocol = (QUICK, PROTOCOL_QUICK) if ctx.quick else (FULL, PROTOCOL_FULL)
    return run_arithmetic(cfg, ctx, protocol)


STUDY = Study(
    name="qprobe",
    claim=CLAIM,
    metric=METRIC,
    lower_is_better=False,
    run=_run,
    seeds=PROTOCOL_FULL.seeds,
    cost=COST,
    quick_seeds=PROTOCOL_QUICK.seeds,
    description="Q-probe selection on a tiny GPT's sampled additions: L_Q, L_CE, L_PG vs pass@1 and pass@k, "
                "beta tuned on held-out questions, a shuffled-reward control",
    protocol=lambda quick: PROTOCOL_QUICK if quick else PROTOCOL_FULL,
)
