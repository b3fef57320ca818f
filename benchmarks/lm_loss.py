"""Per-sequence LM losses from hidden states: chunked (``per_sequence_lm_loss``) against materialised logits.

Both variants compute the per-sequence mean token loss ``[B]`` of a causal LM head and back-propagate
``sum_i l_i`` into the hidden states and the output embedding:

- ``materialised``: ``F.linear(hidden, W)`` -> ``F.cross_entropy(logits.float(), reduction="none")``
  -> :func:`reweighting.sequence_loss` (what the Trainer adapter does with a model's logits);
- ``chunked``: :func:`reweighting.lm_loss.per_sequence_lm_loss` (logits one chunk of tokens at a time).

Cases: SmolLM2's vocabulary (49,152) and a 128k vocabulary (128,256, Llama 3), hidden size 576,
float32 and bfloat16 autocast, ``B x T`` tokens (default 4 x 512). Two figures per case:

- peak memory: each variant runs once in a fresh subprocess; the figure is the growth of the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs
  exist) during one forward + backward, so it counts every allocation of the call, gradients included;
- time of forward + backward: medians over interleaved repeats in this process, one thread, and the
  median of the paired ratios.

Run: ``python -m benchmarks.lm_loss [--seq-len 512] [--repeats 5]`` (writes ``bench-results/lm_loss.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

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
HIDDEN = 576
VOCABS = {"49k (SmolLM2)": 49_152, "128k (Llama 3)": 128_256}
DTYPES = ("float32", "bf16-autocast")
REPEATS = 5


def _inputs(vocab: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, seq_len, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (BATCH, seq_len), generator=g)
    return hidden, weight, targets


def _step(variant: str, dtype: str, hidden, weight, targets) -> Callable[[], None]:
    import reweighting as rw
    from reweighting.lm_loss import per_sequence_lm_loss

    autocast = dtype == "bf16-autocast"

    def materialised() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = F.linear(hidden, weight)
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        rw.sequence_loss(token_loss).sum().backward()

    def chunked() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = per_sequence_lm_loss(hidden, weight, targets)
        loss.sum().backward()

    def run() -> None:
        hidden.grad = weight.grad = None
        {"materialised": materialised, "chunked": chunked}[variant]()

    return run


def _child(variant: str, dtype: str, vocab: int, seq_len: int) -> None:
    """In a fresh process: peak RSS growth (MiB) of one forward + backward, printed as JSON."""
    torch.set_num_threads(1)
    hidden, weight, targets = _inputs(vocab, seq_len)
    run = _step(variant, dtype, hidden, weight, targets)
    print(json.dumps({"peak_mib": peak_rss_growth_mib(run)}))


def peak_memory_mib(variant: str, dtype: str, vocab: int, seq_len: int) -> float:
    return peak_mib_in_subprocess(
        f"from benchmarks.lm_loss import _child; _child({variant!r}, {dtype!r}, {vocab}, {seq_len})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"T (default {SEQ_LEN})")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"interleaved repeats (default {REPEATS})")
    parser.add_argument("--vocab", choices=list(VOCABS), action="append", help="default: all")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="default: all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for vname in args.vocab or list(VOCABS):
        vocab = VOCABS[vname]
        for dtype in args.dtype or list(DTYPES):
            memory = {v: peak_memory_mib(v, dtype, vocab, args.seq_len) for v in ("materialised", "chunked")}
            hidden, weight, targets = _inputs(vocab, args.seq_len)
            times = time_interleaved(
                {v: _step(v, dtype, hidden, weight, targets) for v in ("materialised", "chunked")},
                repeats=args.repeats, warmup=1,
            )
            rows.append({
                "vocab": vname, "dtype": dtype, "tokens": BATCH * args.seq_len,
                "materialised MiB": memory["materialised"], "chunked MiB": memory["chunked"],
                "memory ratio": memory["chunked"] / memory["materialised"],
                "materialised s": statistics.median(times["materialised"]),
                "chunked s": statistics.median(times["chunked"]),
                "time ratio (median)": median_ratio(times, "chunked", "materialised"),
                "times": times,
            })
            del hidden, weight, targets
            print_table(rows[-1:], [c for c in rows[-1] if c != "times"])
    columns = [c for c in rows[0] if c != "times"]
    print()
    print_table(rows, columns)
    path = write_results("lm_loss", {
        "batch": BATCH, "seq_len": args.seq_len, "hidden": HIDDEN, "repeats": args.repeats,
        "threads": 1, "rows": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
