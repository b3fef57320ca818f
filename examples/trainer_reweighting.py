"""Per-sample reweighting inside a Hugging Face ``Trainer`` run (a tiny random GPT-2; nothing is downloaded).

The data are the Python standard library's source files as bytes (token = byte + 1, 0 pads), cut
into fixed-length rows. Each row carries a ``sample_weight`` of ``1 / rows of its file``, so every
file counts the same however long it is; the reweighter then tilts within each global batch::

    python examples/trainer_reweighting.py --reweighter linupper --steps 100
    python examples/trainer_reweighting.py --reweighter presence --accumulation-steps 1
    torchrun --nproc-per-node 2 examples/trainer_reweighting.py --reweighter quadratic   # weights over both ranks
    python examples/trainer_reweighting.py --padding-free                               # a sample is a document

The Trainer's logs gain ``weights/ess_fraction``, ``weights/max_min_ratio``,
``weights/documents_per_step``, ... beside ``loss``.

``--padding-free``: the samples are short documents (each file's blank-line separated blocks, up
to ``--seq-len`` bytes, weighted ``1 / blocks of its file``), and ``DataCollatorWithFlattening``
puts each micro-batch into one row with ``position_ids`` restarting at every document; the
adapter weights the documents, not the row. The model is then a tiny random Llama (its attention
keeps the documents of a row apart).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import datasets
import torch
from transformers import (
    DataCollatorWithFlattening,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    default_data_collator,
)

import reweighting as rw
from reweighting.integrations.hf_trainer import ReweightingTrainer
from reweighting.studies.lm import pack_sequences, stdlib_documents


def build_dataset(seq_len: int, max_documents: int | None) -> datasets.Dataset:
    documents, _ = stdlib_documents(max_documents)
    ids, weights = [], []
    for doc in documents:
        rows = pack_sequences([doc], seq_len - 1) if len(doc) >= seq_len else None
        if rows is None:
            continue
        ids.append(rows + 1)  # byte b -> token b + 1, keeping 0 for padding
        weights += [1.0 / rows.shape[0]] * rows.shape[0]
    ids = torch.cat(ids)
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "labels": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
        "sample_weight": weights,
    })


def build_documents(seq_len: int, max_documents: int | None) -> datasets.Dataset:
    """Short documents (blank-line separated blocks of each file), token = byte + 1, weight 1 / blocks of the file."""
    files, _ = stdlib_documents(max_documents)
    ids, weights = [], []
    for f in files:
        blocks = [b[:seq_len] for b in f.split(b"\n\n") if len(b) >= 16]
        ids += [[byte + 1 for byte in b] for b in blocks]
        weights += [1.0 / len(blocks)] * len(blocks)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "sample_weight": weights})


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reweighter", choices=("none", "linupper", "quadratic", "extremes", "presence"),
                   default="linupper")
    p.add_argument("--temperature", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--accumulation-steps", type=int, default=2)
    p.add_argument("--accumulation", choices=("global", "micro"), default="global",
                   help="normalise the weights over the whole accumulation window, or per micro-batch (the paper)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-documents", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--sampling", choices=("random", "sequential"), default="random",
                   help="data order; sequential makes runs on different numbers of processes comparable")
    p.add_argument("--padding-free", action="store_true",
                   help="documents flattened into one row per micro-batch (DataCollatorWithFlattening)")
    p.add_argument("--out", default=None, help="write the Trainer's log history here (JSON, main process)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    dataset_fn, collator = build_dataset, default_data_collator
    if args.padding_free:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=args.seq_len, attention_dropout=args.dropout,
            attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0))
        dataset_fn, collator = build_documents, DataCollatorWithFlattening()
    extra = {}
    if args.reweighter == "presence":
        # Score only the first block's LayerNorms (the paper scores the first layers; cheap) and update the
        # rest by autograd. The engine also has a rule for GPT-2's Conv1D, should a wider scope be wanted.
        if args.padding_free:  # per-document self-influence; the Llama keeps a row's documents apart
            norms = [model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm]
        else:
            norms = [model.transformer.h[0].ln_1, model.transformer.h[0].ln_2]
        extra["self_influence"] = rw.SelfInfluence(model, modules=norms, bookkeeping=False)
        extra["reweighter"] = rw.PresenceReweighter(switch_step=args.steps // 2)
    elif args.reweighter != "none":
        extra["reweighter"] = rw.LossReweighter(args.reweighter, temperature=args.temperature,
                                                accumulation=args.accumulation)
    else:
        extra["accumulation"] = args.accumulation

    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=args.output_dir or tmp, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation_steps, max_steps=args.steps, learning_rate=args.lr,
            logging_steps=max(args.steps // 10, 1), save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), train_sampling_strategy=args.sampling,
        )
        trainer = ReweightingTrainer(model=model, args=training, train_dataset=dataset_fn(args.seq_len,
                                     args.max_documents), data_collator=collator, **extra)
        trainer.train()
    if args.out and trainer.is_world_process_zero():
        with open(args.out, "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
    return trainer.state.log_history


if __name__ == "__main__":
    main()
