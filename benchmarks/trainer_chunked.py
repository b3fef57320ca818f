"""``ReweightingTrainer`` per-sample losses: ``chunked_loss=True`` against the plain path (the model's logits).

One training ``compute_loss`` + ``backward`` of a ``ReweightingTrainer`` with a ``LossReweighter`` on a
tiny random Llama with SmolLM2's vocabulary (49,152) and a narrow body (hidden 64, 2 layers), so that
the ``[B, T, V]`` logits dominate memory as they do at scale:

- ``plain``: the model computes its logits; the adapter takes per-sample losses from them;
- ``chunked``: ``chunked_loss=True``: the model is called with ``logits_to_keep`` empty and the losses
  come from the last hidden state and the output embedding, a chunk of tokens at a time.

Figures: peak memory (growth of the peak resident set, ``VmHWM``, during one compute_loss + backward,
each variant in a fresh subprocess) and the median of paired time ratios over interleaved repeats,
one thread. Run: ``python -m benchmarks.trainer_chunked [--seq-len 512] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from benchmarks import (
    median_ratio,
    peak_mib_in_subprocess,
    peak_rss_growth_mib,
    print_table,
    time_interleaved,
    write_results,
)

BATCH = 4
SEQ_LEN = 512
VOCAB = 49_152
REPEATS = 5


def _trainer_and_batch(chunked: bool, seq_len: int, model=None):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, default_data_collator

    import reweighting as rw
    from reweighting.integrations.hf_trainer import ReweightingTrainer

    torch.manual_seed(0)
    if model is None:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=seq_len, attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, seq_len), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = ReweightingTrainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                                 reweighter=rw.LossReweighter("linupper", temperature=0.4), chunked_loss=chunked)
    batch = {"input_ids": ids, "labels": ids.clone()}
    return trainer, batch


def _step(trainer, batch):
    def run() -> None:
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, dict(batch)).backward()

    return run


def _child(chunked: bool, seq_len: int) -> None:
    """In a fresh process: peak RSS growth (MiB) of one compute_loss + backward, printed as JSON."""
    torch.set_num_threads(1)
    trainer, batch = _trainer_and_batch(chunked, seq_len)
    run = _step(trainer, batch)
    print(json.dumps({"peak_mib": peak_rss_growth_mib(run)}))


def peak_memory_mib(chunked: bool, seq_len: int) -> float:
    return peak_mib_in_subprocess(f"from benchmarks.trainer_chunked import _child; _child({chunked!r}, {seq_len})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"T (default {SEQ_LEN})")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"interleaved repeats (default {REPEATS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    memory = {name: peak_memory_mib(name == "chunked", args.seq_len) for name in ("plain", "chunked")}
    plain, batch = _trainer_and_batch(False, args.seq_len)
    chunked, _ = _trainer_and_batch(True, args.seq_len, model=plain.model)
    times = time_interleaved({"plain": _step(plain, batch), "chunked": _step(chunked, batch)},
                             repeats=args.repeats, warmup=1)
    row = {"vocab": VOCAB, "tokens": BATCH * args.seq_len, "plain MiB": memory["plain"],
           "chunked MiB": memory["chunked"], "memory ratio": memory["chunked"] / memory["plain"],
           "plain s": statistics.median(times["plain"]), "chunked s": statistics.median(times["chunked"]),
           "time ratio (median)": median_ratio(times, "chunked", "plain")}
    print_table([row], list(row))
    path = write_results("trainer_chunked", {"batch": BATCH, "seq_len": args.seq_len, "repeats": args.repeats,
                                             "threads": 1, "row": row, "times": times})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
