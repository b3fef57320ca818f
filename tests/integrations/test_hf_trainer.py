"""ReweightingTrainer on a tiny randomly initialised GPT-2 (no download): losses, weights, accumulation, PRESENCE."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator  # noqa: E402

import reweighting as rw  # noqa: E402
from reweighting.integrations.hf_trainer import (  # noqa: E402
    ReweightingTrainer,
    causal_lm_sequence_losses,
    combine_weights,
)

VOCAB, T, N = 48, 12, 16


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def toy_dataset(n=N, with_weights=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    ids = ids * mask
    columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist(),
               "note": [f"doc {i}" for i in range(n)]}  # a column the model does not take: removed
    if with_weights:
        columns["sample_weight"] = (torch.rand(n, generator=g) * 2 + 0.1).tolist()
    return datasets.Dataset.from_dict(columns)


def make_trainer(tmp_path, *, batch=4, accumulation_steps=1, max_steps=2, dataset=None, model=None, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation_steps,
        max_steps=max_steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    return ReweightingTrainer(model=model or tiny_model(), args=args, train_dataset=dataset or toy_dataset(),
                              data_collator=default_data_collator, **kwargs)


def independent_sequence_losses(logits, labels):
    """Per-sequence mean next-token loss, one sequence at a time (no shared code with the adapter)."""
    out = []
    for lg, lb in zip(logits, labels):
        lg, lb = lg[:-1], lb[1:]
        keep = lb != -100
        out.append(F.cross_entropy(lg[keep].float(), lb[keep]))
    return torch.stack(out)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_weight_column_survives_and_loss_equals_the_core(tmp_path):
    trainer = make_trainer(tmp_path, reweighter=rw.LossReweighter("linupper", temperature=0.4))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "sample_weight" in batch and "note" not in batch
    assert batch["sample_weight"].dtype == torch.float32 and batch["sample_weight"].shape == (4,)
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, dict(batch))

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = independent_sequence_losses(logits, batch["labels"])
    torch.testing.assert_close(causal_lm_sequence_losses(logits, batch["labels"]), losses)
    r = rw.LossReweighter("linupper", temperature=0.4).weights(losses)
    w = batch["sample_weight"] * r / (batch["sample_weight"] * r).sum()
    torch.testing.assert_close(loss, (w * losses).sum())
    combined = combine_weights(r, batch["sample_weight"], 4, losses.device)
    torch.testing.assert_close(loss, rw.weighted_loss(losses, combined))


def test_training_steps_change_the_model_and_log_weight_diagnostics(tmp_path):
    reweighter = rw.LossReweighter("quadratic", temperature=0.4)
    trainer = make_trainer(tmp_path, max_steps=3, reweighter=reweighter)
    before = params(trainer.model)
    trainer.train()
    assert not torch.allclose(before, params(trainer.model))
    assert reweighter.num_steps == 3  # one count per optimizer step
    # A run resumed at step 5 continues the reweighter's schedule (warm-up, stage switch) from 5.
    trainer.state.global_step = 5
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert reweighter.num_steps == 5
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        assert torch.isfinite(torch.tensor(h["loss"]))
        assert 0 < h["weights/ess_fraction"] <= 1 and h["weights/max_min_ratio"] >= 1


@pytest.mark.parametrize("reweighter", [None, "linupper"])
def test_accumulating_two_micro_batches_equals_one_doubled_batch(tmp_path, reweighter):
    def run(batch, steps, accumulation="global"):
        rwr = rw.LossReweighter("linupper", temperature=0.4) if reweighter else None
        trainer = make_trainer(tmp_path, batch=batch, accumulation_steps=steps, max_steps=2, reweighter=rwr,
                               accumulation=accumulation)
        trainer.train()
        return params(trainer.model), [h["loss"] for h in trainer.state.log_history if "loss" in h]

    doubled, doubled_losses = run(8, 1)
    window, window_losses = run(4, 2)
    torch.testing.assert_close(window, doubled, atol=2e-6, rtol=1e-5)
    assert window_losses == pytest.approx(doubled_losses, rel=1e-5)
    if reweighter:  # per-micro-batch normalisation (the paper's) is a different update: the check has teeth
        micro, _ = run(4, 2, "micro")
        assert not torch.allclose(micro, doubled, atol=1e-5)


def test_presence_gradient_equals_the_weighted_reference(tmp_path):
    model = tiny_model()
    chosen = [model.transformer.h[0].ln_1, model.transformer.h[0].ln_2]
    si = rw.SelfInfluence(model, modules=chosen, bookkeeping=False)
    presence = rw.PresenceReweighter(switch_step=1)
    trainer = make_trainer(tmp_path, model=model, dataset=toy_dataset(with_weights=False), reweighter=presence,
                           self_influence=si)
    batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad()
    trainer.training_step(model, dict(batch))
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = independent_sequence_losses(logits, batch["labels"])
    chosen_params = [p for m in chosen for p in m.parameters()]
    si_ref = torch.stack([
        sum(g.square().sum() for g in torch.autograd.grad(losses[i], chosen_params, retain_graph=True))
        for i in range(4)
    ])
    w = torch.softmax((si_ref - si_ref.mean()) / torch.sqrt(si_ref.var(unbiased=False) + 1e-8), 0)  # tau = +1
    (w * losses).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_presence_trains_and_switches_stage(tmp_path):
    model = tiny_model()
    si = rw.SelfInfluence(model, modules=[model.transformer.h[0].ln_1], bookkeeping=False)
    presence = rw.PresenceReweighter(switch_step=1)
    trainer = make_trainer(tmp_path, model=model, max_steps=2, reweighter=presence, self_influence=si)
    trainer.train()
    assert presence.step == 2 and presence.tau == -1.0
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2  # all() over no logs would pass vacuously
    assert all("weights/ess" in h and 0 < h["weights/ess_fraction"] <= 1 for h in logged)


def test_bad_input_raises_clear_errors(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    bad = dict(batch, sample_weight=torch.tensor([0.5, -1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match=r"sample_weight has negative values at sample indices \[1, 2\]"):
        trainer.compute_loss(trainer.model, bad)
    with pytest.raises(ValueError, match="zero for every sample"):
        trainer.compute_loss(trainer.model, dict(batch, sample_weight=torch.zeros(4)))
    unlabelled = {k: v for k, v in batch.items() if k != "sample_weight"}
    unlabelled["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no sample of the global batch has a labelled token"):
        make_trainer(tmp_path).compute_loss(trainer.model, unlabelled)
    with pytest.raises(TypeError, match="weights"):
        make_trainer(tmp_path, reweighter=object())
    with pytest.raises(ValueError, match="self_influence"):
        make_trainer(tmp_path, reweighter=rw.PresenceReweighter(switch_step=1))
    with pytest.raises(ValueError, match="accumulation"):
        make_trainer(tmp_path, accumulation="window")
