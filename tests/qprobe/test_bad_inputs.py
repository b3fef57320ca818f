"""A sweep of bad inputs across the public Q-probe API: each must give a clear error (the right
type, naming the argument) or, where the input is odd but meaningful, the exact answer.

``ERRORS`` holds ``(id, call, error type, words the message must contain)``; ``CORRECT`` holds
``(id, call, expected)``. The counts are asserted at the end so that the sweep cannot shrink
unnoticed.
"""

import math

import pytest
import torch

from reweighting.qprobe import (
    OpenAICompatible,
    QProbe,
    bce_loss,
    chunk_groups,
    evaluate_probe,
    exact_match,
    expected_return,
    extract_number,
    fit_probe,
    mean_reward,
    mse_loss,
    numeric_match,
    pass_at_k,
    pg_loss,
    preference_loss,
    sample_and_embed,
    sample_with_features,
    select,
    selection_weights,
)
from reweighting.qprobe.tiny import tiny_llama

NAN = float("nan")
X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
R = (X[:, 0] > 0).float()
G = torch.arange(40) // 4


def fit(**overrides):
    kwargs = dict(features=X, rewards=R, groups=G, objective="pg", epochs=1, batch_size=20, progress=False)
    kwargs.update(overrides)
    return fit_probe(**kwargs)


_MODEL = {}


def tiny():
    if not _MODEL:
        _MODEL["m"] = tiny_llama(layers=2)
    return _MODEL["m"]


def sample(**overrides):
    model, tokenizer = tiny()
    kwargs = dict(prompts=["a", "b"], k=2, max_new_tokens=2, progress=False)
    kwargs.update(overrides)
    return sample_with_features(model, tokenizer, **kwargs)


def api_sample(prompt, n):
    return [f"{prompt}{i}" for i in range(n)]


def api_embed(texts):
    return [[float(len(t)), 1.0] for t in texts]


def client(**overrides):
    kwargs = dict(base_url="http://127.0.0.1:9/v1", model="m")
    kwargs.update(overrides)
    return OpenAICompatible(**kwargs)


Q = torch.tensor([[0.1, 0.5, -0.2], [1.0, 0.0, 0.3]])
RT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])

ERRORS = [
    # --- the cases
    ("score wrong width", lambda: QProbe(4).score(torch.zeros(3, 5)), ValueError, ["features", "4", "(3, 5)"]),
    ("layer beyond depth", lambda: sample(layer=3), ValueError, ["layer", "[-3, 2]"]),
    ("layer beyond depth, negative", lambda: sample(layer=-4), ValueError, ["layer"]),
    ("prompts as one string", lambda: sample(prompts="What is 2+2?"), TypeError, ["prompts", "single str"]),
    ("evaluate k beyond samples", lambda: expected_return(Q, RT, 4, 0.1), ValueError, ["k", "3"]),
    # --- fit_probe
    ("fit: features 1-d", lambda: fit(features=X[:, 0]), ValueError, ["features", "[samples, dim]"]),
    ("fit: features a list", lambda: fit(features=X.tolist()), TypeError, ["features", "list"]),
    ("fit: rewards wrong length", lambda: fit(rewards=R[:-1]), ValueError, ["rewards", "(40,)"]),
    ("fit: rewards a list", lambda: fit(rewards=R.tolist()), TypeError, ["rewards", "list"]),
    ("fit: NaN reward", lambda: fit(rewards=torch.where(torch.arange(40) == 7, NAN, R)), ValueError,
     ["rewards", "NaN", "[7]"]),
    ("fit: infinite feature", lambda: fit(features=X.index_put((torch.tensor([3]),), torch.tensor(math.inf))),
     ValueError, ["features", "[3]"]),
    ("fit: unknown objective", lambda: fit(objective="hinge"), ValueError, ["objective", "'hinge'"]),
    ("fit: pg without groups", lambda: fit(groups=None), ValueError, ["groups"]),
    ("fit: groups wrong length", lambda: fit(groups=G[:5]), ValueError, ["groups", "(40,)"]),
    ("fit: fractional groups", lambda: fit(groups=G.float() + 0.5), TypeError, ["groups", "integer"]),
    ("fit: epochs 0", lambda: fit(epochs=0), ValueError, ["epochs"]),
    ("fit: batch_size 0", lambda: fit(batch_size=0), ValueError, ["batch_size"]),
    ("fit: negative lr", lambda: fit(lr=-1.0), ValueError, ["lr"]),
    ("fit: lr None", lambda: fit(lr=None), TypeError, ["lr", "None"]),
    ("fit: lr text", lambda: fit(lr="1e-3"), TypeError, ["lr", "'1e-3'"]),
    ("fit: weight decay text", lambda: fit(weight_decay="0.1"), TypeError, ["weight_decay", "'0.1'"]),
    ("fit: pg with constant rewards", lambda: fit(rewards=torch.ones(40)), ValueError,
     ["'pg'", "different rewards", "zero gradient"]),
    ("fit: pg with rewards constant within each group", lambda: fit(rewards=(G % 2).float()), ValueError,
     ["'pg'", "different rewards"]),
    ("fit: NaN lr", lambda: fit(lr=NAN), ValueError, ["lr"]),
    ("fit: negative weight decay", lambda: fit(weight_decay=-0.1), ValueError, ["weight_decay"]),
    ("fit: group_size 0", lambda: fit(group_size=0), ValueError, ["group_size"]),
    ("fit: temperature 0", lambda: fit(temperature=0.0), ValueError, ["temperature"]),
    ("fit: hidden width 0", lambda: fit(hidden=[0]), ValueError, ["hidden"]),
    ("fit: bce reward 2", lambda: fit(objective="bce", rewards=R * 2), ValueError, ["rewards", "[0, 1]"]),
    ("fit: preference with no pair", lambda: fit(objective="preference", rewards=torch.ones(40)), ValueError,
     ["rewards", "preference", "different rewards"]),
    ("fit: pg with one sample per group", lambda: fit(groups=torch.arange(40)), ValueError,
     ["groups", "one sample"]),
    ("fit: cuda without CUDA", lambda: fit(device="cuda") if not torch.cuda.is_available() else
     fit(device="cuda:99"), ValueError, ["device"]),
    ("chunk_groups: size 0", lambda: chunk_groups(G, 0), ValueError, ["size"]),
    ("chunk_groups: 2-d groups", lambda: chunk_groups(G.reshape(4, 10), 2), ValueError, ["groups", "1-d"]),
    # --- QProbe
    ("QProbe dim 0", lambda: QProbe(0), ValueError, ["dim"]),
    ("QProbe fractional dim", lambda: QProbe(4.5), TypeError, ["dim", "4.5"]),
    ("QProbe negative hidden", lambda: QProbe(4, [-1]), ValueError, ["hidden"]),
    ("score a list", lambda: QProbe(2).score([[1.0, 2.0]]), TypeError, ["features", "list"]),
    ("score NaN", lambda: QProbe(2).score(torch.tensor([[1.0, NAN]])), ValueError, ["features", "NaN", "[0]"]),
    ("score batch_size 0", lambda: QProbe(2).score(torch.zeros(1, 2), batch_size=0), ValueError, ["batch_size"]),
    ("forward wrong width", lambda: QProbe(3)(torch.zeros(2, 2)), ValueError, ["features", "3"]),
    ("standardization shape", lambda: QProbe(3).set_standardization(torch.zeros(2), torch.ones(2)), ValueError,
     ["mean", "scale", "(3,)"]),
    ("standardization scale 0", lambda: QProbe(2).set_standardization(torch.zeros(2), torch.zeros(2)), ValueError,
     ["scale", "> 0"]),
    ("load missing file", lambda: QProbe.load("/nonexistent/probe.safetensors"), FileNotFoundError,
     ["/nonexistent/probe.safetensors"]),
    # --- objectives
    ("mse shapes", lambda: mse_loss(torch.zeros(3), torch.zeros(4)), ValueError, ["q", "rewards", "(3,)", "(4,)"]),
    ("mse empty", lambda: mse_loss(torch.zeros(0), torch.zeros(0)), ValueError, ["q", "empty"]),
    ("mse NaN reward", lambda: mse_loss(torch.zeros(2), torch.tensor([0.0, NAN])), ValueError, ["rewards", "[1]"]),
    ("bce reward out of range", lambda: bce_loss(torch.zeros(2), torch.tensor([0.0, 1.5])), ValueError,
     ["rewards", "[0, 1]", "[1]"]),
    ("pg 1-d q", lambda: pg_loss(torch.zeros(3), torch.zeros(3)), ValueError, ["q", "[groups, samples]"]),
    ("pg temperature 0", lambda: pg_loss(Q, RT, temperature=0.0), ValueError, ["temperature"]),
    ("pg mask shape", lambda: pg_loss(Q, RT, torch.ones(2, 2, dtype=torch.bool)), ValueError, ["mask"]),
    ("pg empty group", lambda: pg_loss(Q, RT, torch.tensor([[True] * 3, [False] * 3])), ValueError,
     ["groups with no sample", "[1]"]),
    ("pg NaN baseline", lambda: pg_loss(Q, RT, baseline=NAN), ValueError, ["baseline"]),
    ("preference shapes", lambda: preference_loss(torch.zeros(2), torch.zeros(3)), ValueError,
     ["q_preferred", "q_rejected"]),
    ("preference empty", lambda: preference_loss(torch.zeros(0), torch.zeros(0)), ValueError, ["q_preferred"]),
    # --- select
    ("select negative beta", lambda: select(Q, -0.1), ValueError, ["beta"]),
    ("select NaN beta", lambda: select(Q, NAN), ValueError, ["beta"]),
    ("select 3-d q", lambda: select(torch.zeros(2, 2, 2), 0.1), ValueError, ["q", "[prompts, k]"]),
    ("select NaN q", lambda: select(torch.tensor([[0.0, NAN]]), 0.1), ValueError, ["q", "NaN"]),
    ("select no candidates", lambda: select(torch.zeros(2, 0), 0.1), ValueError, ["q", "k = 0"]),
    ("select mask all off", lambda: select(Q, 0.1, mask=torch.tensor([[True] * 3, [False] * 3])), ValueError,
     ["mask", "[1]"]),
    ("weights infinite beta", lambda: selection_weights(Q, math.inf), ValueError, ["beta"]),
    # --- evaluate
    ("expected_return k 0", lambda: expected_return(Q, RT, 0, 0.1), ValueError, ["k"]),
    ("expected_return fractional k", lambda: expected_return(Q, RT, 1.5, 0.1), TypeError, ["k", "1.5"]),
    ("expected_return shapes", lambda: expected_return(Q[:, :2], RT, 1, 0.1), ValueError, ["q", "rewards"]),
    ("expected_return NaN reward", lambda: expected_return(Q, RT.index_put((torch.tensor([1]), torch.tensor([2])),
                                                                              torch.tensor(NAN)), 1, 0.1),
     ValueError, ["rewards", "NaN"]),
    ("pass_at_k 1-d", lambda: pass_at_k(torch.ones(3), 1), ValueError, ["rewards", "[prompts, samples]"]),
    ("pass_at_k NaN reward", lambda: pass_at_k(torch.tensor([[NAN, 1.0]]), 1), ValueError, ["rewards", "NaN"]),
    ("mean_reward NaN", lambda: mean_reward(torch.tensor([[NAN, 1.0]])), ValueError, ["rewards", "NaN"]),
    ("evaluate_probe k beyond", lambda: evaluate_probe(Q, RT, [1, 8], [0.0]), ValueError, ["k", "3"]),
    ("evaluate_probe negative beta", lambda: evaluate_probe(Q, RT, [1], [-1.0]), ValueError, ["beta"]),
    # --- rewards
    ("extract_number which", lambda: extract_number("1 2", "middle"), ValueError, ["which", "'middle'"]),
    ("extract_number not text", lambda: extract_number(12), TypeError, ["text", "int"]),
    ("numeric_match word answer", lambda: numeric_match("7", "seven"), ValueError, ["answer", "'seven'"]),
    ("numeric_match NaN answer", lambda: numeric_match("7", NAN), ValueError, ["answer"]),
    ("numeric_match negative tolerance", lambda: numeric_match("7", 7, tolerance=-1), ValueError, ["tolerance"]),
    ("exact_match None", lambda: exact_match(None, "a"), TypeError, ["completion", "NoneType"]),
    # --- features
    ("sample k 0", lambda: sample(k=0), ValueError, ["k"]),
    ("sample temperature 0", lambda: sample(temperature=0.0), ValueError, ["temperature"]),
    ("sample top_p 0", lambda: sample(top_p=0.0), ValueError, ["top_p"]),
    ("sample stop string", lambda: sample(stop_strings="\n"), TypeError, ["stop_strings"]),
    ("sample no prompts", lambda: sample(prompts=[]), ValueError, ["prompts", "empty"]),
    ("sample non-text prompts", lambda: sample(prompts=["a", 2]), TypeError, ["prompts", "[1]"]),
    ("sample batch_size 0", lambda: sample(batch_size=0), ValueError, ["batch_size"]),
    # --- api
    ("api prompts as one string", lambda: sample_and_embed("hello", api_sample, api_embed, 2, progress=False),
     TypeError, ["prompts"]),
    ("api k 0", lambda: sample_and_embed(["a"], api_sample, api_embed, 0, progress=False), ValueError, ["k"]),
    ("api sample too few", lambda: sample_and_embed(["a"], lambda p, n: ["x"], api_embed, 3, progress=False),
     ValueError, ["sample", "expected k = 3"]),
    ("api embed wrong shape", lambda: sample_and_embed(["a"], api_sample, lambda t: [[1.0]], 2, progress=False),
     ValueError, ["embed", "(1, 1)"]),
    ("api embed NaN", lambda: sample_and_embed(["a"], api_sample, lambda t: [[NAN]] * len(t), 2, progress=False),
     ValueError, ["embed", "NaN"]),
    ("api sample not text", lambda: sample_and_embed(["a"], lambda p, n: [1] * n, api_embed, 2, progress=False),
     TypeError, ["sample", "strings"]),
    ("client base_url", lambda: client(base_url="localhost:8000"), ValueError, ["base_url"]),
    ("client pooling", lambda: client(pooling="max"), ValueError, ["pooling", "'max'"]),
    ("client max_tokens 0", lambda: client(max_tokens=0), ValueError, ["max_tokens"]),
    ("client timeout 0", lambda: client(timeout=0), ValueError, ["timeout"]),
    ("client timeout text", lambda: client(timeout="5"), TypeError, ["timeout", "'5'"]),
    ("client timeout NaN", lambda: client(timeout=NAN), ValueError, ["timeout"]),
    ("client temperature text", lambda: client(temperature="hot"), TypeError, ["temperature", "'hot'"]),
    ("client temperature None", lambda: client(temperature=None), TypeError, ["temperature", "None"]),
    ("client batch", lambda: client(batch="maybe"), ValueError, ["batch", "'maybe'"]),
    ("client check_model text", lambda: client(check_model="no"), TypeError, ["check_model"]),
    ("client empty embedding model", lambda: client(embedding_model=""), ValueError, ["embedding_model"]),
    ("client seed text", lambda: client(seed="1"), ValueError, ["seed"]),
    ("client negative temperature", lambda: client(temperature=-1.0), ValueError, ["temperature"]),
    ("client empty model", lambda: client(model=""), ValueError, ["model"]),
    ("client sample n 0", lambda: client().sample("a", 0), ValueError, ["n"]),
    ("client sample prompt list", lambda: client().sample(["a"], 1), TypeError, ["prompt"]),
    ("client embed one string", lambda: client().embed("abc"), TypeError, ["texts"]),
]

CORRECT = [
    # odd but meaningful inputs: the exact answer
    ("10-20 is a range", lambda: extract_number("10-20"), 20.0),
    ("10-20 first", lambda: extract_number("10-20", "first"), 10.0),
    ("1,2,3 is a list", lambda: extract_number("1,2,3"), 3.0),
    ("1.5e3 has an exponent", lambda: extract_number("1.5e3"), 1500.0),
    ("thousands", lambda: extract_number("about 1,234,567 people"), 1234567.0),
    ("negative after a space", lambda: extract_number("it is -4"), -4.0),
    ("numeric_match on a range", lambda: numeric_match("between 10-20", 20), 1.0),
    ("score [..., dim] keeps the leading shape", lambda: tuple(QProbe(2).score(torch.zeros(2, 3, 2)).shape), (2, 3)),
    ("select beta 0 ties go to the first", lambda: select(torch.tensor([1.0, 1.0]), 0.0)[0].item(), 0),
    ("evaluate k equal to samples", lambda: round(float(expected_return(Q, RT, 3, 0.0)), 6), 0.0),
    ("evaluate k 1 is the mean reward", lambda: round(float(expected_return(Q, RT, 1, 0.0)), 6), 0.5),
]


@pytest.mark.parametrize("name, call, error, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_gives_a_clear_error(name, call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"


@pytest.mark.parametrize("name, call, expected", CORRECT, ids=[c[0] for c in CORRECT])
def test_odd_input_gives_the_exact_answer(name, call, expected):
    assert call() == expected


def test_pg_with_a_group_of_different_rewards_fits():
    rewards = torch.zeros(40)
    rewards[0] = 1.0  # one group of ten has a signal: enough to learn from
    probe = fit(rewards=rewards, epochs=2)
    assert probe.score(X).shape == (40,)


def _prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2 + 2 =", "answer": 4}\n')
    return str(path)


@pytest.mark.parametrize("name", ["no-such-model", "no-such-org/no-such-model", "./missing-folder"])
def test_qprobe_sample_with_a_missing_model_fails_at_once_without_a_hub(name, tmp_path, capsys, monkeypatch):
    import transformers

    from reweighting.cli import main

    def no_loading(*args, **kwargs):  # nothing may try to load (and so reach a hub)
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    code = main(["qprobe", "sample", "--model", name, "--prompts", _prompts(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"--model {name}: no such folder" in err[0] and "downloads nothing" in err[0]


def test_qprobe_help_is_plain_text(capsys):
    from reweighting.cli import main

    for argv in (["qprobe", "--help"], ["qprobe", "train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and "METHODS" not in text
    with pytest.raises(SystemExit):
        main(["qprobe", "--help"])
    assert "- sample: k completions per prompt" in capsys.readouterr().out


def test_sweep_size():
    assert len(ERRORS) >= 90 and len(CORRECT) >= 10
