"""Sweep of plausible bad inputs to the weight core, the loss-based reweighter, resampling and the sampler.

Every bad input must raise the stated error type with a message that names the argument (and,
where it applies, what was expected and the sample indices); every legal-but-unusual input must
give the exact answer. One case per input; ``test_sweep_size`` keeps the sweep from shrinking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import reweighting as rw
from reweighting import distributed as D
from reweighting.loss_based import LossReweighter, strategy_scores
from reweighting.sampler import AliasTable, DistributedWeightedSampler

t = torch.tensor
X = t([1.0, 2.0, 4.0])
NAN, INF = float("nan"), float("inf")


@dataclass
class Bad:
    name: str
    call: Callable[[], object]
    error: type[Exception]
    message: str  # regex; names the argument


@dataclass
class Legal:
    name: str
    call: Callable[[], object]
    check: Callable[[object], bool]


def _attached_twice():
    r = LossReweighter()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    r.attach(opt)
    r.attach(opt)


def _attached_then_step():
    r = LossReweighter()
    r.attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    r.step()


def _sampler_after(n: int, world: int, rank: int = 0) -> dict:
    s = DistributedWeightedSampler(torch.ones(40), num_replicas=world, rank=rank, seed=1)
    it = iter(s)
    for _ in range(n):
        next(it)
    return s.state_dict()


def _old_sampler_state() -> dict:
    return {k: v for k, v in _sampler_after(3, 2).items() if k != "num_replicas"}


BAD = [
    # ------------------------------------------------------------ weighted_loss / weight_stats
    Bad("weighted_loss NaN weight", lambda: rw.weighted_loss(X, t([0.5, NAN, 0.5])), ValueError,
        r"weights must be finite and >= 0, but has NaN values at sample indices \[1\]"),
    Bad("weighted_loss inf weight", lambda: rw.weighted_loss(X, t([INF, 0.5, 0.5])), ValueError,
        r"weights .* infinite values at sample indices \[0\]"),
    Bad("weighted_loss negative weight", lambda: rw.weighted_loss(X, t([0.5, 0.6, -0.1])), ValueError,
        r"weights .* negative values at sample indices \[2\]"),
    Bad("weighted_loss all-zero weights", lambda: rw.weighted_loss(X, torch.zeros(3)), ValueError,
        "weights are all zero"),
    Bad("weighted_loss integer losses", lambda: rw.weighted_loss(t([1, 2, 3]), X / 7), TypeError,
        "per_sample_loss must be a floating-point tensor"),
    Bad("weighted_loss integer weights", lambda: rw.weighted_loss(X, t([1, 0, 0])), TypeError,
        "weights must be a floating-point tensor"),
    Bad("weighted_loss list weights", lambda: rw.weighted_loss(X, [0.2, 0.3, 0.5]), TypeError,
        "weights must be a torch.Tensor, got list"),
    Bad("weighted_loss 2-d losses", lambda: rw.weighted_loss(torch.ones(3, 2), X / 7), ValueError,
        r"per_sample_loss must be 1-d .* shape \(3, 2\)"),
    Bad("weighted_loss length mismatch", lambda: rw.weighted_loss(X, t([0.5, 0.5])), ValueError,
        "per_sample_loss has 3 samples but weights has 2"),
    Bad("weighted_loss empty", lambda: rw.weighted_loss(t([]), t([])), ValueError, "per_sample_loss is empty"),
    Bad("weight_stats negative", lambda: rw.weight_stats(t([0.7, 0.5, -0.2])), ValueError,
        r"weights .* negative values at sample indices \[2\]"),
    Bad("weight_stats NaN", lambda: rw.weight_stats(t([NAN, 1.0])), ValueError,
        r"weights .* NaN values at sample indices \[0\]"),
    Bad("weight_stats all zero", lambda: rw.weight_stats(torch.zeros(4)), ValueError, "weights are all zero"),
    Bad("weight_stats integer", lambda: rw.weight_stats(t([1, 1])), TypeError, "weights must be a floating-point"),
    Bad("weight_stats float mask", lambda: rw.weight_stats(X, mask=t([1.0, 0.0, 1.0])), TypeError,
        "mask must be a bool tensor"),
    # ------------------------------------------------------------ sequence_loss
    Bad("sequence_loss empty row", lambda: rw.sequence_loss(torch.ones(2, 3), t([[1, 1, 0], [0, 0, 0]])),
        ValueError, r"mask has no real token in sequences \[1\]"),
    Bad("sequence_loss soft mask", lambda: rw.sequence_loss(torch.ones(2, 2), t([[0.5, 1.0], [1.0, 1.0]])),
        ValueError, r"mask must hold only 0 and 1 .* sequences \[0\]"),
    Bad("sequence_loss mask shape", lambda: rw.sequence_loss(torch.ones(2, 3), torch.ones(2, 2)), ValueError,
        r"mask shape \(2, 2\) does not match token_loss shape \(2, 3\)"),
    Bad("sequence_loss 1-d", lambda: rw.sequence_loss(X), ValueError, r"token_loss must be \[batch, tokens\]"),
    Bad("sequence_loss 3-d", lambda: rw.sequence_loss(torch.ones(2, 3, 4)), ValueError,
        r"token_loss must be \[batch, tokens\], got shape \(2, 3, 4\)"),
    Bad("sequence_loss integer", lambda: rw.sequence_loss(torch.ones(2, 2, dtype=torch.long)), TypeError,
        "token_loss must be a floating-point tensor"),
    Bad("sequence_loss no tokens", lambda: rw.sequence_loss(torch.ones(2, 0)), ValueError, "token_loss has no tokens"),
    Bad("sequence_loss empty batch", lambda: rw.sequence_loss(torch.ones(0, 3)), ValueError, "token_loss is empty"),
    Bad("sequence_loss empty option", lambda: rw.sequence_loss(torch.ones(2, 2), empty="zero"), ValueError,
        r"empty must be one of \('raise', 'nan'\), got 'zero'"),
    Bad("sequence_loss list mask", lambda: rw.sequence_loss(torch.ones(1, 2), [[1, 1]]), TypeError,
        "mask must be a torch.Tensor"),
    # ------------------------------------------------------------ tilt and normalisations
    Bad("tilt temperature 0", lambda: rw.tilt(X, 0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    Bad("tilt temperature negative", lambda: rw.tilt(X, -1.0), ValueError, "temperature must be a finite number > 0"),
    Bad("tilt temperature inf", lambda: rw.tilt(X, INF), ValueError, "temperature must be a finite number > 0"),
    Bad("tilt temperature NaN", lambda: rw.tilt(X, NAN), ValueError, "temperature must be a finite number > 0"),
    Bad("tilt temperature string", lambda: rw.tilt(X, "0.4"), TypeError, "temperature must be a number, got str"),
    Bad("tilt NaN score", lambda: rw.tilt(t([1.0, NAN]), 1.0), ValueError,
        r"scores has NaN values at sample indices \[1\]"),
    Bad("tilt bool scores", lambda: rw.tilt(t([True, False])), TypeError, "scores must hold real numbers"),
    Bad("tilt complex scores", lambda: rw.tilt(t([1 + 1j, 2 + 0j])), TypeError, "scores must hold real numbers"),
    Bad("tilt 0-d scores", lambda: rw.tilt(t(1.0)), ValueError, r"scores must be 1-d .* shape \(\)"),
    Bad("tilt empty", lambda: rw.tilt(t([])), ValueError, "scores is empty"),
    Bad("tilt list", lambda: rw.tilt([1.0, 2.0]), TypeError, "scores must be a torch.Tensor, got list"),
    Bad("tilt float mask", lambda: rw.tilt(X, mask=t([1.0, 0.0, 1.0])), TypeError, "mask must be a bool tensor"),
    Bad("tilt mask length", lambda: rw.tilt(X, mask=t([True, False])), ValueError,
        r"mask has shape \(2,\) but scores has \(3,\)"),
    Bad("tilt all masked", lambda: rw.tilt(X, mask=torch.zeros(3, dtype=torch.bool)), ValueError,
        "mask excludes every sample of scores"),
    Bad("minmax delta 0", lambda: rw.minmax_normalize(X, 0.0), ValueError, "delta must be a finite number > 0"),
    Bad("minmax delta string", lambda: rw.minmax_normalize(X, "1"), TypeError, "delta must be a number"),
    Bad("minmax eps 0", lambda: rw.minmax_normalize(X, eps=0.0), ValueError, "eps must be a finite number > 0"),
    Bad("minmax inf value", lambda: rw.minmax_normalize(t([1.0, INF, 2.0])), ValueError,
        r"x has infinite values at sample indices \[1\]"),
    Bad("zscore eps negative", lambda: rw.zscore(X, eps=-1e-8), ValueError, "eps must be a finite number > 0"),
    Bad("zscore NaN", lambda: rw.zscore(t([NAN, 1.0])), ValueError, r"x has NaN values at sample indices \[0\]"),
    Bad("rank delta negative", lambda: rw.rank_normalize(X, -1.0), ValueError, "delta must be a finite number > 0"),
    Bad("quantile q 0.5", lambda: rw.quantile_normalize(X, q=0.5), ValueError, r"q must be a number in \[0, 0.5\)"),
    Bad("quantile q NaN", lambda: rw.quantile_normalize(X, q=NAN), ValueError, r"q must be a number in \[0, 0.5\)"),
    Bad("quantile q string", lambda: rw.quantile_normalize(X, q="0.1"), ValueError, "q must be a number"),
    Bad("normalize unknown method", lambda: rw.normalize(X, "softmax"), ValueError,
        r"method must be one of \('minmax', 'quantile', 'rank', 'zscore'\), got 'softmax'"),
    Bad("set_checks string", lambda: rw.set_checks("no"), TypeError, "enabled must be True or False"),
    # ------------------------------------------------------------ LossReweighter
    Bad("strategy typo", lambda: LossReweighter("linupeer"), ValueError,
        r"strategy must be one of \('linupper', 'quadratic', 'extremes', 'inverse', 'uniform'\), got 'linupeer'"),
    Bad("strategy_scores typo", lambda: strategy_scores(X, "lin"), ValueError, "strategy must be one of"),
    Bad("normalize zscore for losses", lambda: LossReweighter(normalize="zscore"), ValueError,
        r"normalize must be one of \('minmax', 'quantile', 'rank'\)"),
    Bad("accumulation typo", lambda: LossReweighter(accumulation="window"), ValueError, "accumulation must be one of"),
    Bad("nonfinite typo", lambda: LossReweighter(nonfinite="drop"), ValueError,
        r"nonfinite must be one of \('raise', 'zero'\)"),
    Bad("reweighter temperature 0", lambda: LossReweighter(temperature=0), ValueError, "temperature must be"),
    Bad("reweighter temperature None", lambda: LossReweighter(temperature=None), TypeError,
        "temperature must be a number"),
    Bad("reweighter warmup_temperature", lambda: LossReweighter(warmup_temperature=-1.0), ValueError,
        "warmup_temperature must be"),
    Bad("reweighter delta string", lambda: LossReweighter(delta="1"), TypeError, "delta must be a number"),
    Bad("reweighter warmup bool", lambda: LossReweighter(warmup_steps=True), ValueError,
        "warmup_steps must be an integer >= 0, got True"),
    Bad("reweighter warmup fraction", lambda: LossReweighter(warmup_steps=2.5), ValueError, "warmup_steps must be"),
    Bad("reweighter NaN loss", lambda: LossReweighter()(t([1.0, NAN, 2.0])), ValueError,
        r"per_sample_loss has NaN values at sample indices \[1\]"),
    Bad("reweighter integer losses", lambda: LossReweighter()(t([1, 2, 3])), TypeError,
        "per_sample_loss must be a floating-point tensor"),
    Bad("reweighter 2-d losses", lambda: LossReweighter()(torch.ones(2, 2)), ValueError, "per_sample_loss must be 1-d"),
    Bad("reweighter empty", lambda: LossReweighter()(t([])), ValueError, "per_sample_loss is empty"),
    Bad("reweighter float mask", lambda: LossReweighter()(X, mask=t([1.0, 1.0, 0.0])), TypeError,
        "mask must be a bool tensor"),
    Bad("reweighter mask length", lambda: LossReweighter().weights(X, mask=t([True])), ValueError,
        r"mask has shape \(1,\) but per_sample_loss has \(3,\)"),
    Bad("reweighter everything masked", lambda: LossReweighter().weights(X, mask=torch.zeros(3, dtype=torch.bool)),
        ValueError, "no sample of per_sample_loss is left to weight"),
    Bad("reweighter all NaN under zero", lambda: LossReweighter(nonfinite="zero").weights(t([NAN, NAN])),
        ValueError, "no sample of per_sample_loss is left.* 2 non-finite"),
    Bad("attach twice", _attached_twice, RuntimeError, "already attached to an optimizer"),
    Bad("attach then step", _attached_then_step, RuntimeError, r"rw.step\(\) was called while rw.attach"),
    Bad("attach a non-optimizer", lambda: LossReweighter().attach(object()), TypeError,
        "optimizer must be a torch.optim.Optimizer"),
    Bad("load_state_dict negative", lambda: LossReweighter().load_state_dict({"num_steps": -1}), ValueError,
        "'num_steps' >= 0"),
    Bad("accumulate with an iterator", lambda: LossReweighter().accumulate(iter([X]), lambda b: b), TypeError,
        "micro_batches must be a list or tuple"),
    Bad("accumulate empty window", lambda: LossReweighter().accumulate([], lambda b: b), ValueError,
        "micro_batches is empty"),
    Bad("accumulate_weighted non-callable", lambda: rw.accumulate_weighted([X], None, lambda w: w), TypeError,
        "per_sample_loss_fn must be callable"),
    Bad("score_window loss fn returns a float", lambda: rw.score_window([X], lambda b: 1.0), TypeError,
        "per_sample_loss_fn must return a 1-d float tensor .* got float for micro-batch 0"),
    Bad("accumulate_weighted weight_fn length",
        lambda: rw.accumulate_weighted([X.clone().requires_grad_()], lambda b: b * 1.0, lambda w: w[:2]), ValueError,
        "window losses has 3 samples but weight_fn output has 2"),
    # ------------------------------------------------------------ resampling
    Bad("multinomial negative weight", lambda: rw.multinomial_resample(t([1.0, -1.0])), ValueError,
        r"weights has negative values at sample indices \[1\]"),
    Bad("multinomial num_samples fraction", lambda: rw.multinomial_resample(X, 2.5), ValueError,
        "num_samples must be a whole number"),
    Bad("multinomial num_samples string", lambda: rw.multinomial_resample(X, "2"), TypeError,
        "num_samples must be an integer"),
    Bad("systematic num_samples 0", lambda: rw.systematic_resample(X, 0), ValueError,
        "num_samples must be an integer >= 1"),
    Bad("multinomial integer weights", lambda: rw.multinomial_resample(t([1, 2])), TypeError,
        "weights must be a floating-point tensor"),
    Bad("resample_counts method", lambda: rw.resample_counts(X, method="stratified"), ValueError,
        r"method must be one of \('multinomial', 'systematic'\), got 'stratified'"),
    Bad("resample_counts list", lambda: rw.resample_counts([1.0, 2.0]), TypeError, "weights must be a torch.Tensor"),
    Bad("dirichlet alpha 0", lambda: rw.dirichlet_weights(X, 0.0), ValueError, "alpha must be a finite number > 0"),
    Bad("dirichlet alpha string", lambda: rw.dirichlet_weights(X, "1"), TypeError, "alpha must be a number"),
    Bad("dirichlet num_draws 0", lambda: rw.dirichlet_weights(X, 1.0, 0), ValueError,
        "num_draws must be an integer >= 1"),
    # ------------------------------------------------------------ alias table and sampler
    Bad("alias string", lambda: AliasTable("abc"), TypeError, "weights must be a tensor or a sequence of numbers"),
    Bad("alias 2-d", lambda: AliasTable(torch.ones(2, 2)), ValueError, "weights must be 1-d"),
    Bad("alias NaN", lambda: AliasTable(t([1.0, NAN])), ValueError, r"weights has NaN values at sample indices \[1\]"),
    Bad("alias uniform out of range", lambda: AliasTable(X).from_uniform(t([0.2, 1.5])), ValueError,
        r"u must lie in \[0, 1\)"),
    Bad("alias negative uniform", lambda: AliasTable(X).from_uniform(t([-0.1])), ValueError, r"u must lie in \[0, 1\)"),
    Bad("alias sample -1", lambda: AliasTable(X).sample(-1), ValueError, "num_samples must be an integer >= 0"),
    Bad("sampler num_samples 0", lambda: DistributedWeightedSampler(X, 0), ValueError,
        "num_samples must be an integer >= 1"),
    Bad("sampler rank out of range", lambda: DistributedWeightedSampler(X, num_replicas=2, rank=2), ValueError,
        r"rank must be in \[0, 2\)"),
    Bad("sampler replacement string", lambda: DistributedWeightedSampler(X, replacement="no"), TypeError,
        "replacement must be True or False"),
    Bad("sampler chunk_size 0", lambda: DistributedWeightedSampler(X, chunk_size=0), ValueError,
        "chunk_size must be an integer >= 1"),
    Bad("sampler set_epoch string", lambda: DistributedWeightedSampler(X).set_epoch("1"), TypeError,
        "epoch must be an integer"),
    Bad("sampler too many draws without replacement",
        lambda: DistributedWeightedSampler(t([1.0, 0.0, 1.0]), 3, replacement=False), ValueError,
        "num_samples=3 draws without replacement need"),
    Bad("sampler resume on a world size that cannot split",
        lambda: DistributedWeightedSampler(torch.ones(40), num_replicas=3, seed=1)
        .load_state_dict(_sampler_after(5, 2)),
        ValueError, "cannot resume exactly on 3 ranks"),
    Bad("sampler old mid-epoch state", lambda: DistributedWeightedSampler(torch.ones(40), num_replicas=2)
        .load_state_dict(_old_sampler_state()), ValueError, "state has no 'num_replicas'"),
    Bad("sampler state not a dict", lambda: DistributedWeightedSampler(X).load_state_dict([1]), TypeError,
        "state must be a dict"),
    Bad("gather_rows 1-d", lambda: D.gather_rows(X, 4), ValueError, r"x must be 2-d \[rows, columns\]"),
]


def _uniform(n):
    return lambda w: torch.allclose(w, torch.full((n,), 1 / n))


LEGAL = [
    Legal("tilt integer scores", lambda: rw.tilt(t([1, 2])),
          lambda w: torch.allclose(w, torch.softmax(t([1.0, 2.0]), 0))),
    Legal("tilt float64 scores", lambda: rw.tilt(X.double(), 0.5),
          lambda w: w.dtype == torch.float32 and torch.allclose(w, torch.softmax(X / 0.5, 0))),
    Legal("tilt integer temperature", lambda: rw.tilt(X, 2), lambda w: torch.allclose(w, torch.softmax(X / 2, 0))),
    Legal("zscore constant input (the epsilon)", lambda: rw.zscore(torch.full((5,), 2.0)),
          lambda s: bool(torch.isfinite(s).all()) and float(s.abs().max()) == 0.0),
    Legal("minmax constant input", lambda: rw.minmax_normalize(torch.full((3,), 7.0)),
          lambda h: torch.equal(h, torch.zeros(3))),
    Legal("rank of one sample", lambda: rw.rank_normalize(t([3.0])), lambda h: torch.equal(h, torch.zeros(1))),
    Legal("sequence_loss bool mask", lambda: rw.sequence_loss(t([[1.0, 3.0]]), t([[True, False]])),
          lambda v: torch.equal(v, t([1.0]))),
    Legal("sequence_loss empty='nan' row", lambda: rw.sequence_loss(t([[1.0, 3.0], [2.0, 2.0]]), t([[1, 1], [0, 0]]),
                                                                    empty="nan"),
          lambda v: v[0] == 2.0 and math.isnan(float(v[1]))),
    Legal("sequence_loss NaN in padding", lambda: rw.sequence_loss(t([[1.0, NAN]]), t([[1, 0]])),
          lambda v: torch.equal(v, t([1.0]))),
    Legal("weighted_loss zero weight on a NaN loss", lambda: rw.weighted_loss(t([1.0, NAN]), t([1.0, 0.0])),
          lambda v: float(v) == 1.0),
    Legal("weighted_loss float64 losses", lambda: rw.weighted_loss(X.double(), t([0.5, 0.5, 0.0])),
          lambda v: v.dtype == torch.float32 and float(v) == 1.5),
    Legal("reweighter nonfinite zero", lambda: LossReweighter(nonfinite="zero").weights(t([1.0, NAN, 1.0])),
          lambda w: torch.equal(w, t([0.5, 0.0, 0.5]))),
    Legal("reweighter masked NaN", lambda: LossReweighter().weights(t([1.0, NAN, 1.0]), mask=t([True, False, True])),
          lambda w: torch.equal(w, t([0.5, 0.0, 0.5]))),
    Legal("reweighter equal losses", lambda: LossReweighter().weights(torch.full((4,), 3.0)), _uniform(4)),
    Legal("reweighter one sample", lambda: LossReweighter().weights(t([5.0])), lambda w: torch.equal(w, t([1.0]))),
    Legal("reweighter bfloat16 losses", lambda: LossReweighter("uniform")(X.bfloat16()),
          lambda v: v.dtype == torch.float32 and abs(float(v) - 7 / 3) < 1e-6),
    Legal("weight_stats masked negative entry",
          lambda: rw.weight_stats(t([0.5, 0.5, -1.0]), mask=t([True, True, False])),
          lambda s: float(s.n) == 2 and abs(float(s.entropy) - math.log(2)) < 1e-6),
    Legal("multinomial with whole float count", lambda: rw.multinomial_resample(X, 4.0), lambda i: i.shape == (4,)),
    Legal("dirichlet integer alpha", lambda: rw.dirichlet_weights(X, 3), lambda d: abs(float(d.sum()) - 1) < 1e-5),
    Legal("alias table from a list", lambda: AliasTable([1.0, 3.0]).probabilities(),
          lambda p: torch.allclose(p, t([0.25, 0.75], dtype=torch.float64))),
    Legal("sampler resume on a divisor world size",
          lambda: _resumed_position(_sampler_after(6, 2), 4), lambda p: p == 3),
]


def _resumed_position(state, world):
    s = DistributedWeightedSampler(torch.ones(40), num_replicas=world, seed=1)
    s.load_state_dict(state)
    return s.position


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_input_gives_a_clear_error(case):
    with pytest.raises(case.error) as info:
        case.call()
    assert re.search(case.message, str(info.value)), str(info.value)


@pytest.mark.parametrize("case", LEGAL, ids=[c.name for c in LEGAL])
def test_legal_unusual_input_gives_the_exact_result(case):
    assert case.check(case.call())


def test_sweep_size():
    # inputs tried / clear errors / correct results, for the closing note of the sweep
    assert len(BAD) >= 90 and len(LEGAL) >= 20
    assert len({c.name for c in BAD + LEGAL}) == len(BAD) + len(LEGAL)
