"""The ``qprobe-smollm2`` study's pipeline on a tiny random LM (SmolLM2 is too slow for CI): the pooled
sampler (prompt run once, features as a separate forward pass reads them), the cache, and the
per-seed replicates drawn from the pool."""

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from reweighting.qprobe.tiny import tiny_llama  # noqa: E402
from reweighting.studies import StudyContext, get_study  # noqa: E402
from reweighting.studies.qprobe_eval import part_names  # noqa: E402
from reweighting.studies.qprobe_pool import pooled_samples, question_seed, sample_question  # noqa: E402
from reweighting.studies.qprobe_smollm2 import (  # noqa: E402
    FULL,
    LARGE,
    SETTING_ENV,
    SmolConfig,
    draw_replicate,
    questions,
    run_smollm2,
    split_questions,
)

SMOKE = replace(FULL, layer=2, max_new_tokens=4, pool=4, test_prompts=6, test_samples=4, train_prompts=6,
                train_samples=4, val_prompts=4, val_samples=4, ks=(1, 2, 4), betas=(0.0, 0.1), probe_epochs=3,
                beta_resamples=10)
TEMPLATE = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"


def tiny_lm():
    """A byte-level tokenizer with a minimal chat template and a 3-block random Llama."""
    return tiny_llama(hidden_size=32, intermediate_size=64, layers=3, heads=2, kv_heads=1, max_positions=128,
                      chat_template=TEMPLATE)


def test_questions_and_per_seed_splits():
    qa = questions()
    assert len(qa) == 200 and ("What is seven plus five?", 12) in qa and ("What is seven times five?", 35) in qa
    a = split_questions(0, (80, 80, 40))
    assert [len(x) for x in a] == [80, 80, 40]
    assert len(set(torch.cat(a).tolist())) == 200  # disjoint and complete
    b = split_questions(1, (80, 80, 40))
    assert not torch.equal(a[0], b[0])  # each seed has its own split
    assert torch.equal(a[0], split_questions(0, (80, 80, 40))[0])


def test_sampled_features_are_the_states_that_emitted_the_last_token():
    model, tok = tiny_lm()
    g = torch.Generator().manual_seed(3)
    # EOS about a third of the draws: some completions end early while others run on
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    model.lm_head.bias.data[tok.eos_token_id] = 5.0
    completions, feats, tokens = sample_question(model, tok, "What is one plus one?", 12, layer=2, max_new_tokens=6,
                                                 temperature=1.0, top_k=0, generator=g)
    assert len(completions) == 12 and feats.shape == (12, 32) and len(tokens) == 12
    lengths = {len(t) for t in tokens}
    assert min(lengths) < 6 and max(lengths) == 6
    text = tok.apply_chat_template([{"role": "user", "content": "What is one plus one?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    for drawn, feature in zip(tokens, feats):
        # the feature is the state that emitted the completion's last token (EOS, or the 6th drawn)
        ids = torch.tensor([prompt + drawn])
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(feature, states[len(prompt) + len(drawn) - 2], atol=1e-4, rtol=1e-4)
    # with EOS by far the likeliest token, every completion ends at once: the feature is the prompt's last state
    model.lm_head.bias.data[tok.eos_token_id] = 100.0
    completions, feats, tokens = sample_question(model, tok, "What is one plus one?", 3, layer=2, max_new_tokens=6,
                                                 temperature=1.0, top_k=0, generator=g)
    assert completions == ["", "", ""] and tokens == [[tok.eos_token_id]] * 3
    states = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(feats, states[-1].expand(3, -1), atol=1e-4, rtol=1e-4)


def test_pool_is_cached_per_question_and_independent_of_the_others(tmp_path):
    loads = []

    def load():
        loads.append(1)
        return tiny_lm()

    settings = {"layer": 2, "max_new_tokens": 4, "temperature": 1.0, "top_k": 50, "seed": 0}
    box: dict = {}
    first = pooled_samples(["What is one plus one?", "What is two plus two?"], 3, settings=settings, model_id="tiny",
                           load=load, cache=tmp_path, model_box=box)
    assert loads == [1] and first["features"].shape == (2, 3, 32) and len(list(tmp_path.glob("*.pt"))) == 2
    # alone, and second in another list: the same completions (the generator is the question's own)
    alone = pooled_samples(["What is two plus two?"], 3, settings=settings, model_id="tiny", load=load,
                           cache=tmp_path / "other", model_box=box)
    assert alone["completions"][0] == first["completions"][1]
    torch.testing.assert_close(alone["features"][0], first["features"][1])
    # each question draws from a generator seeded by its own text and the pool's seed
    model, tok = box["model"], box["tokenizer"]
    own = torch.Generator().manual_seed(question_seed("What is two plus two?", 0))
    texts, feats, _ = sample_question(model, tok, "What is two plus two?", 3, layer=2, max_new_tokens=4,
                                      temperature=1.0, top_k=50, generator=own)
    assert texts == first["completions"][1]
    assert question_seed("What is two plus two?", 0) != question_seed("What is one plus one?", 0)
    assert question_seed("What is two plus two?", 0) != question_seed("What is two plus two?", 1)
    again = pooled_samples(["What is two plus two?", "What is one plus one?"], 3, settings=settings, model_id="tiny",
                           load=load, cache=tmp_path, model_box={})
    assert loads == [1]  # all read back: no model loaded
    assert again["completions"] == first["completions"][::-1]
    pooled_samples(["What is one plus one?"], 3, settings={**settings, "temperature": 0.5}, model_id="tiny",
                   load=load, cache=tmp_path, model_box={})
    assert loads == [1, 1] and len(list(tmp_path.glob("*.pt"))) == 3  # another setting, another entry


def test_replicates_draw_their_own_questions_and_completions_without_replacement():
    cfg = replace(FULL, pool=8, test_prompts=5, test_samples=8, train_prompts=5, train_samples=3, val_prompts=4,
                  val_samples=6, ks=(1, 2, 8))
    # feature = (question, column), reward = a known function of both: alignment is checkable
    q, c = torch.meshgrid(torch.arange(200), torch.arange(8), indexing="ij")
    features = torch.stack([q, c], dim=-1).float()
    rewards = ((q + c) % 3 == 0).float()
    sets, picked = draw_replicate(cfg, 0, features, rewards)
    other, other_picked = draw_replicate(cfg, 1, features, rewards)
    assert not torch.equal(picked["test"], other_picked["test"])
    assert not set(picked["test"].tolist()) & set(picked["fit"].tolist())
    assert not set(picked["fit"].tolist()) & set(picked["val"].tolist())
    for name, n in (("fit", 3), ("val", 6), ("test", 8)):
        s = sets[name]
        assert s.rewards.shape == (len(picked[name]), n)
        qs, cs = s.features[..., 0].long(), s.features[..., 1].long()
        assert torch.equal(qs, picked[name][:, None].expand(-1, n))
        assert torch.equal(s.rewards, ((qs + cs) % 3 == 0).float())
        assert all(len(set(row)) == n for row in cs.tolist())  # without replacement
    # the test questions use all 8 of their pool, in each seed's own order
    assert not torch.equal(sets["test"].features[..., 1], torch.arange(8).expand(5, -1))


def test_config_refuses_draws_beyond_the_pool():
    with pytest.raises(ValueError, match="test_samples"):
        SmolConfig(pool=8, test_samples=16)
    with pytest.raises(ValueError, match="largest k"):
        SmolConfig(ks=(1, 32))
    with pytest.raises(ValueError, match="200 questions"):
        SmolConfig(test_prompts=150, train_prompts=40, val_prompts=20)
    with pytest.raises(ValueError, match="34 questions"):
        SmolConfig(question_stride=6, test_prompts=20, train_prompts=10, val_prompts=5)
    SmolConfig(question_stride=6, test_prompts=20, train_prompts=10, val_prompts=4)
    assert max(LARGE.ks) == 48 and LARGE.test_samples == 48


def test_protocol_declares_the_parts_and_the_large_setting(monkeypatch):
    study = get_study("qprobe-smollm2")
    default = study.protocol(False)
    assert [p.name for p in default.parts] == part_names(FULL.ks)
    assert default.seeds == study.seeds >= 5 and "k up to 16 instead of 48" in json.dumps(default.as_dict())
    monkeypatch.setenv(SETTING_ENV, "large")
    large = study.protocol(False)
    assert [p.name for p in large.parts] == part_names(LARGE.ks) and large.fingerprint() != default.fingerprint()
    monkeypatch.setenv(SETTING_ENV, "huge")
    with pytest.raises(ValueError, match=SETTING_ENV):
        study.protocol(False)


def test_smollm2_study_pipeline_and_cache(tmp_path):
    loads = []

    def load():
        loads.append(1)
        return tiny_lm()

    ctx = StudyContext(quick=True, seeds=[0, 1], out_dir=tmp_path / "out", device=torch.device("cpu"),
                       show_progress=False)
    ctx.out_dir.mkdir()
    cache = tmp_path / "cache"
    qa = questions()[::10]
    first = run_smollm2(SMOKE, ctx, load=load, model_id="tiny", cache=cache, qa=qa)
    assert loads == [1] and first.config["sampled_now"]
    assert len(list(cache.glob("*.pt"))) == 20  # one pool per question
    k_max = max(SMOKE.ks)
    assert set(first.methods) >= {"pass@1", "L_Q", "L_CE", "L_PG", "shuffled L_PG", f"pass@{k_max} (oracle)"}
    assert all(len(v) == 2 for v in first.methods.values())
    for name in ("pass@1", "L_Q", "L_CE", "L_PG", "shuffled L_PG"):
        for value, oracle in zip(first.methods[name], first.methods[f"pass@{k_max} (oracle)"]):
            assert 0.0 <= value <= oracle + 1e-6
    assert [p.name for p in first.parts] == part_names(SMOKE.ks)
    from reweighting.studies import decide

    assert isinstance(first.holds, bool) and first.holds == (decide(first.parts, first.baseline) == "holds")
    for plot in first.plots:
        assert (ctx.out_dir / plot).stat().st_size > 0
    json.dumps(first.details, default=str)

    second = run_smollm2(SMOKE, ctx, load=load, model_id="tiny", cache=cache, qa=qa)
    with pytest.raises(ValueError, match="exceed the 20 questions"):
        run_smollm2(replace(SMOKE, test_prompts=15), ctx, load=load, model_id="tiny", cache=cache, qa=qa)
    assert loads == [1] and not second.config["sampled_now"]
    assert second.methods == first.methods
    # the two seeds are different replicates: they test different questions
    assert first.details["test_question_overlap_between_seeds"] < 1.0
    # a perturbed run samples its own pool (the cached one carries the unperturbed rounding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REWEIGHTING_PERTURB", "threads")
        perturbed = run_smollm2(SMOKE, ctx, load=load, model_id="tiny", cache=cache, qa=qa)
    assert loads == [1, 1] and perturbed.config["sampled_now"]
    assert len(list(cache.glob("*.pt"))) == 40
