"""ReweightingTrainer on padding-free and packed batches (a sample is a document), empty rows, columns, resume."""

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    default_data_collator,
)

import reweighting as rw  # noqa: E402
from reweighting.integrations.hf_trainer import ReweightingTrainer, batch_documents  # noqa: E402

from .test_hf_trainer import make_trainer, params, tiny_model, toy_dataset  # noqa: E402

VOCAB, WIDTH = 40, 14
LENGTHS = [5, 9, 3, 12, 7, 4, 10, 6, 8, 2, 11, 5]  # documents; 2 tokens is one labelled token


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def documents(with_weights=True):
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    columns = {"input_ids": rows, "labels": [list(r) for r in rows]}
    if with_weights:
        columns["sample_weight"] = (torch.rand(len(rows), generator=g) + 0.2).tolist()
    return datasets.Dataset.from_dict(columns)


def pad_one_per_row(features):
    """The same documents padded one per row (the reference): right padding, labels -100 there."""
    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        n = len(f["input_ids"])
        ids.append(f["input_ids"] + [0] * (width - n))
        mask.append([1] * n + [0] * (width - n))
        labels.append(f["labels"] + [-100] * (width - n))
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    if "sample_weight" in features[0]:
        batch["sample_weight"] = torch.tensor([f["sample_weight"] for f in features])
    return batch


def llama_trainer(tmp_path, collator, *, batch=3, steps=1, max_steps=2, dataset=None, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
        max_steps=max_steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, remove_unused_columns=False,
    )
    return ReweightingTrainer(model=tiny_llama(), args=args, train_dataset=dataset or documents(),
                              data_collator=collator, **kwargs)


@pytest.mark.parametrize("steps, accumulation, flash_kwargs, reweighter", [
    (1, None, False, True), (2, "global", True, True), (2, "micro", False, True),
    (2, None, False, False),  # only the per-document sample_weight column, normalised over the window
])
def test_flattened_batches_equal_the_documents_padded_one_per_row(tmp_path, flash_kwargs, steps, accumulation,
                                                                  reweighter):
    """DataCollatorWithFlattening: all documents of a micro-batch in one row; weights per document."""
    def run(collator):
        trainer = llama_trainer(tmp_path, collator, steps=steps, accumulation=accumulation,
                                reweighter=rw.LossReweighter("linupper", temperature=0.4) if reweighter else None)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        return params(trainer.model), logged

    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    got, logged = run(flat)
    want, want_logged = run(pad_one_per_row)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in want_logged], rel=1e-5)
    # Every step weighs 3 * steps documents (that arrived as 1 * steps rows).
    assert [h["weights/documents_per_step"] for h in logged] == [3.0 * steps] * 2
    assert not torch.allclose(got, params(tiny_llama()))


def test_flattened_batch_loss_weights_each_document():
    """One flattened row of 4 documents: the loss is sum_d w_d l_d with l_d each document's own mean."""
    ds = documents()
    features = [ds[i] for i in range(4)]
    batch = DataCollatorWithFlattening()(features)
    assert batch["input_ids"].shape[0] == 1
    trainer = llama_trainer("unused", DataCollatorWithFlattening(), reweighter=rw.LossReweighter("linupper", 0.4))
    model = trainer.model
    model.train()
    model.config.use_cache = True  # HF keeps packed documents apart only without a cache: the adapter turns it off
    docs = batch_documents(batch)
    assert docs.count == 4 and docs.length.tolist() == LENGTHS[:4]
    loss = trainer.compute_loss(model, dict(batch))
    alone = []
    for f in features:
        logits = model(input_ids=torch.tensor([f["input_ids"]])).logits
        alone.append(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(f["labels"][1:])))
    alone = torch.stack(alone)
    w = rw.LossReweighter("linupper", 0.4).weights(alone.detach())
    torch.testing.assert_close(loss, (w * alone).sum(), atol=1e-6, rtol=1e-5)


def test_packed_rows_with_document_ids_equal_padded(tmp_path):
    """Packed rows (several documents per row, a document_ids column, restarting position_ids)."""
    g = torch.Generator().manual_seed(4)
    layout = [[5, 9], [3, 4, 7], [6, 8], [2, 12]]
    ids, pos, doc_ids, labels, singles = [], [], [], [], []
    for row in layout:
        tokens = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in row]
        singles += tokens
        ids.append(sum(tokens, []))
        pos.append(sum([list(range(n)) for n in row], []))
        doc_ids.append(sum([[d] * n for d, n in enumerate(row)], []))
        labels.append(sum([[-100] + t[1:] for t in tokens], []))  # no loss across a document boundary
    packed = datasets.Dataset.from_dict({"input_ids": ids, "position_ids": pos, "document_ids": doc_ids,
                                         "labels": labels})
    single = datasets.Dataset.from_dict({"input_ids": singles, "labels": singles})

    def run(dataset, collator, batch):
        trainer = llama_trainer(tmp_path, collator, batch=batch, dataset=dataset,
                                reweighter=rw.LossReweighter("linupper", temperature=0.4))
        trainer.train()
        return params(trainer.model), trainer

    # Every step takes the whole data set (the two data sets are shuffled differently).
    got, trainer = run(packed, default_data_collator, 4)
    want, _ = run(single, pad_one_per_row, 9)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["weights/documents_per_step"] for h in logged] == [9.0, 9.0]


def test_rows_restarting_positions_are_never_one_sample(tmp_path):
    trainer = llama_trainer(tmp_path, DataCollatorWithFlattening(), reweighter=rw.LossReweighter("linupper", 0.4))
    batch = DataCollatorWithFlattening()([documents()[i] for i in range(3)])
    model = trainer.model
    model.train()
    trainer.compute_loss(model, dict(batch))
    assert trainer.reweighter.stats.n == 3  # three documents weighted, though the batch is one row
    bad = dict(batch, position_ids=batch["position_ids"].clone())
    bad["position_ids"][0, 7] = 9  # neither continues (+1) nor restarts at 0
    with pytest.raises(ValueError, match=r"position_ids neither restart at 0.*\(row 0, position 7\)"):
        trainer.compute_loss(model, bad)
    # PRESENCE on packed rows whose attention crosses documents (no restarting positions) would not be exact.
    presence_model = tiny_llama()
    si = rw.SelfInfluence(presence_model, modules=[presence_model.model.norm], bookkeeping=False)
    presence = llama_trainer(tmp_path, DataCollatorWithFlattening(), reweighter=rw.PresenceReweighter(switch_step=1),
                             self_influence=si)
    presence.model = presence_model
    crossing = {"input_ids": batch["input_ids"], "labels": batch["labels"],
                "document_ids": batch_documents(batch).index}
    with pytest.raises(ValueError, match="packs 3 documents into 1 rows.*PRESENCE's per-document self-influence"):
        presence.training_step(presence_model, crossing)


def test_presence_on_a_flattened_batch_weights_each_document(tmp_path):
    """PRESENCE per document of a DataCollatorWithFlattening row = the weighted gradient of the documents alone."""
    features = [documents()[i] for i in range(4)]
    batch = DataCollatorWithFlattening()(features)
    model = tiny_llama()
    chosen = [model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm]
    si = rw.SelfInfluence(model, modules=chosen, bookkeeping=False)
    trainer = llama_trainer(tmp_path, DataCollatorWithFlattening(), reweighter=rw.PresenceReweighter(switch_step=1),
                            self_influence=si)
    trainer.model = model
    model.zero_grad()
    trainer.training_step(model, dict(batch))
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    alone = []
    for f in features:
        logits = model(input_ids=torch.tensor([f["input_ids"]])).logits
        alone.append(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(f["labels"][1:])))
    alone = torch.stack(alone)
    chosen_params = [p for m in chosen for p in m.parameters()]
    si_ref = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(alone[d], chosen_params,
                                                                            retain_graph=True))
                          for d in range(4)])
    w = rw.PresenceReweighter(switch_step=1).weights(si_ref)
    (w * alone).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_weight_column_per_document_must_match_the_documents(tmp_path):
    trainer = llama_trainer(tmp_path, DataCollatorWithFlattening())
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["sample_weight"].shape == (3,) and batch["input_ids"].shape[0] == 1
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    with pytest.raises(ValueError, match="sample_weight has 2 values for a batch of 3 samples"):
        trainer.compute_loss(trainer.model, dict(batch, sample_weight=batch["sample_weight"][:2]))


# ------------------------------------------------------------------ rows without a labelled token
@pytest.mark.parametrize("checks_on", [True, False])
def test_row_without_labelled_token_gets_weight_zero_not_a_fake_loss(tmp_path, checks_on):
    trainer = make_trainer(tmp_path, reweighter=rw.LossReweighter("linupper", temperature=0.4),
                           dataset=toy_dataset(with_weights=False))
    batch = next(iter(trainer.get_train_dataloader()))
    batch["labels"][2] = -100  # an SFT example whose answer was truncated away
    model = trainer.model
    model.train()
    with rw.checks(checks_on):
        loss = trainer.compute_loss(model, dict(batch))
    assert torch.isfinite(loss)
    stats = trainer.reweighter.stats
    assert float(stats.n) == 3 and float(stats.n_masked) == 1
    keep = [0, 1, 3]
    logits = model(input_ids=batch["input_ids"][keep], attention_mask=batch["attention_mask"][keep]).logits
    from .test_hf_trainer import independent_sequence_losses
    rest = independent_sequence_losses(logits, batch["labels"][keep])
    w = rw.LossReweighter("linupper", temperature=0.4).weights(rest.detach())
    torch.testing.assert_close(loss, (w * rest).sum(), atol=1e-6, rtol=1e-5)
    model.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_window_with_an_unlabelled_row_trains(tmp_path):
    ds = toy_dataset(with_weights=False)
    labels = [list(x) for x in ds["labels"]]
    for i in (1, 9):
        labels[i] = [-100] * len(labels[i])
    ds = ds.remove_columns("labels").add_column("labels", labels)
    trainer = make_trainer(tmp_path, dataset=ds, accumulation_steps=2, accumulation="global",
                           reweighter=rw.LossReweighter("linupper", temperature=0.4))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert sum(h["weights/n_masked"] for h in logged) == 2  # 16 rows in 2 steps: both unlabelled rows seen
    assert [h["weights/documents_per_step"] for h in logged] == [8, 8]


# ------------------------------------------------------------------ columns
def test_misspelt_weight_column_raises_naming_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"weight_column='weigth' is not a column of train_dataset; its columns are "
                                         r"\['input_ids', 'attention_mask', 'labels', 'note', 'sample_weight'\]"):
        make_trainer(tmp_path, weight_column="weigth")
    with pytest.raises(ValueError, match="document_column='doc' is not a column"):
        make_trainer(tmp_path, document_column="doc")
    # A dataset without column names (a list of dicts): the first batch says it.
    rows = [dict(toy_dataset()[i]) for i in range(8)]
    for r in rows:
        r.pop("note")
    trainer = make_trainer(tmp_path, dataset=rows, weight_column="weigth")
    with pytest.raises(ValueError, match=r"weight_column='weigth' is not in the training features; they have "
                                         r"\['attention_mask', 'input_ids', 'labels'\] \(after the Trainer removed"):
        next(iter(trainer.get_train_dataloader()))
    # Named explicitly and present: used.
    trainer = make_trainer(tmp_path, weight_column="sample_weight")
    assert "sample_weight" in next(iter(trainer.get_train_dataloader()))


# ------------------------------------------------------------------ resume
def dropout_model():
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=48, n_positions=12, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.2,
                     embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("accumulation", ["global"])  # micro passed before the fix too (no scoring pass)
def test_resumed_run_equals_uninterrupted_with_dropout(tmp_path, accumulation):
    def trainer(out, save):
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
            learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            logging_steps=1, save_strategy="steps" if save else "no", save_steps=2, report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True, save_only_model=False,
        )
        return ReweightingTrainer(model=dropout_model(), args=args, train_dataset=toy_dataset(),
                                  data_collator=default_data_collator, accumulation=accumulation,
                                  reweighter=rw.LossReweighter("linupper", temperature=0.4))

    straight = trainer(tmp_path / "a", save=False)
    straight.train()
    first = trainer(tmp_path / "b", save=True)
    first.train()
    resumed = trainer(tmp_path / "b", save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    torch.testing.assert_close(params(resumed.model), params(straight.model), atol=1e-6, rtol=1e-5)
    assert resumed.reweighter.num_steps == 4
    # Dropout matters here: without it the check could not tell RNG states apart.
    assert not torch.allclose(params(straight.model), params(make_trainer(tmp_path / "c", max_steps=4,
                              accumulation_steps=2, batch=2, model=tiny_model()).model))


@pytest.mark.parametrize("steps", [1, 2])
def test_errors_name_the_dataset_rows(tmp_path, steps):
    """A bad value in dataset row 5: the error names the batch position and the rows the batch came from."""
    ds = toy_dataset()
    weights = list(ds["sample_weight"])
    weights[5] = -1.0
    ds = ds.remove_columns("sample_weight").add_column("sample_weight", weights)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=steps,
                             max_steps=2, learning_rate=0.1, optim="sgd", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = ReweightingTrainer(model=tiny_model(), args=args, train_dataset=ds, data_collator=default_data_collator,
                                 accumulation="global", reweighter=rw.LossReweighter("linupper", temperature=0.4))
    position, rows = (1, "4, 5, 6, 7") if steps == 1 else (5, "0, 1, 2, 3, 4, 5, 6, 7")
    with pytest.raises(ValueError, match=rf"sample_weight has negative values at sample indices \[{position}\].*"
                                         rf"collated from dataset rows \[{rows}\]"):
        trainer.train()
    # The row tag never reaches the model or the user's collator output beyond the adapter.
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["_reweighting_row"].tolist() == [0, 1, 2, 3]


def test_weight_collator_takes_one_weight_per_document_of_a_packed_row():
    from reweighting.integrations.hf_trainer import SampleWeightCollator

    collate = SampleWeightCollator(default_data_collator)
    batch = collate([{"input_ids": [1, 2, 3], "sample_weight": [0.5, 2.0], "_reweighting_row": 7},
                     {"input_ids": [4, 5, 6], "sample_weight": 1.0, "_reweighting_row": 2}])
    assert batch["sample_weight"].tolist() == [0.5, 2.0, 1.0]
    assert batch["_reweighting_row"].tolist() == [7, 2] and batch["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"features \[1\] of the batch have no 'sample_weight'"):
        collate([{"input_ids": [1], "sample_weight": 1.0}, {"input_ids": [2]}])
