"""ReweightingTrainer(chunked_loss=True): per-sample losses without the [B, T, V] logits, equal to the plain path."""

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import DataCollatorWithFlattening  # noqa: E402

import reweighting as rw  # noqa: E402

from .test_hf_trainer import make_trainer, params, tiny_model  # noqa: E402
from .test_hf_trainer_packing import documents, llama_trainer, tiny_llama  # noqa: E402


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["gpt2-padded", "llama-flattened"])
def test_chunked_loss_equals_the_plain_path(tmp_path, case):
    def trainer(chunked):
        kwargs = dict(reweighter=rw.LossReweighter("linupper", temperature=0.4), chunked_loss=chunked,
                      chunk_tokens=5)  # several chunks per batch
        if case == "gpt2-padded":
            return make_trainer(tmp_path, model=tiny_model(), **kwargs)
        return llama_trainer(tmp_path, DataCollatorWithFlattening(), **kwargs)

    plain, chunked = trainer(False), trainer(True)
    batch = next(iter(plain.get_train_dataloader()))
    if case == "gpt2-padded":
        batch["labels"][1] = -100  # a row without a labelled token: weight 0 on both paths
    want_loss, want_grads = loss_and_grads(plain, batch)
    got_loss, got_grads = loss_and_grads(chunked, batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert float(chunked.reweighter.stats.n) == float(plain.reweighter.stats.n)


def test_chunked_loss_trains_like_the_plain_path(tmp_path):
    def run(chunked):
        trainer = make_trainer(tmp_path, model=tiny_model(), accumulation_steps=2, accumulation="global",
                               reweighter=rw.LossReweighter("linupper", temperature=0.4), chunked_loss=chunked)
        trainer.train()
        return params(trainer.model)

    torch.testing.assert_close(run(True), run(False), atol=2e-6, rtol=1e-5)


def test_chunked_loss_refuses_what_it_cannot_compute(tmp_path):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"transforms its logits \({'final_logit_softcapping': 30.0}\)"):
        make_trainer(tmp_path, model=model, dataset=documents(), chunked_loss=True)
    si_model = tiny_model()
    si = rw.SelfInfluence(si_model, modules=[si_model.transformer.h[0].ln_1], bookkeeping=False)
    with pytest.raises(ValueError, match="PRESENCE"):
        make_trainer(tmp_path, model=si_model, reweighter=rw.PresenceReweighter(switch_step=1), self_influence=si,
                     chunked_loss=True)
