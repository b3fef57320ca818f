"""Smoke test of the ``qprobe-smollm2`` study's pipeline on a tiny random LM (SmolLM2 is too slow for CI)."""

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from reweighting.qprobe.tiny import tiny_llama  # noqa: E402
from reweighting.studies import StudyContext, get_study  # noqa: E402
from reweighting.studies.qprobe_smollm2 import FULL, run_smollm2, sample_cached, split_questions  # noqa: E402

SMOKE = replace(FULL, layer=2, max_new_tokens=4, train_prompts=6, train_samples=4, test_prompts=4, test_samples=4,
                prompts_per_call=6, ks=(1, 2, 4), betas=(0.0, 0.1), probe_epochs=3)


def tiny_lm():
    """A byte-level tokenizer with a minimal chat template and a 3-block random Llama."""
    return tiny_llama(hidden_size=32, intermediate_size=64, layers=3, heads=2, kv_heads=1, max_positions=128,
                      chat_template="{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")


def test_split_is_disjoint_and_complete():
    train, test = split_questions()
    assert len(train) + len(test) == 200
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert ("What is seven plus five?", 12) in train + test
    assert ("What is seven times five?", 35) in train + test


def test_smollm2_study_pipeline_and_cache(tmp_path):
    assert get_study("qprobe-smollm2").seeds >= 5
    loads = []

    def load():
        loads.append(1)
        return tiny_lm()

    ctx = StudyContext(quick=True, seeds=[0, 1], out_dir=tmp_path / "out", device=torch.device("cpu"),
                       show_progress=False)
    ctx.out_dir.mkdir()
    cache = tmp_path / "cache"
    first = run_smollm2(SMOKE, ctx, load=load, model_id="tiny", cache=cache)
    assert loads == [1] and first.config["sampled_now"]
    cached = sorted(cache.glob("*.pt"))
    assert len(cached) == 2  # training and test samples
    shapes = sorted(tuple(torch.load(p, weights_only=True)["features"].shape) for p in cached)
    assert shapes == [(4, 4, 32), (6, 4, 32)]
    k_max = max(SMOKE.ks)
    assert set(first.methods) == {"pass@1", "L_Q", "L_CE", "L_PG", f"pass@{k_max} (oracle)"}
    assert all(len(v) == 2 for v in first.methods.values())
    for name in ("pass@1", "L_Q", "L_CE", "L_PG"):
        for value, oracle in zip(first.methods[name], first.methods[f"pass@{k_max} (oracle)"]):
            assert 0.0 <= value <= oracle + 1e-6
    from reweighting.studies import decide

    assert isinstance(first.holds, bool) and first.holds == (decide(first.parts, first.baseline) == "holds")
    for plot in first.plots:
        assert (ctx.out_dir / plot).stat().st_size > 0
    json.dumps(first.details, default=str)

    # The second run reads the cached samples: no model is loaded and the numbers are the same.
    second = run_smollm2(SMOKE, ctx, load=load, model_id="tiny", cache=cache)
    assert loads == [1] and not second.config["sampled_now"]
    assert second.methods == first.methods
    # A different sampling setting is a different cache entry.
    box: dict = {}
    data = sample_cached(["What is one plus one?"], 2, replace(SMOKE, temperature=0.5), "tiny", load, cache, box, ctx)
    assert loads == [1, 1] and len(list(cache.glob("*.pt"))) == 3
    assert data["features"].shape == (1, 2, 32) and len(data["completions"][0]) == 2
