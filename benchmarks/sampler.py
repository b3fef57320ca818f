"""Weighted draws at dataset scale: alias table and sampler against torch.multinomial and WeightedRandomSampler.

For ``n`` items in {1e6, 1e7, 1e8} with heavy-tailed weights, one "epoch" of ``m = min(n, 1e7)``
draws with replacement, timed interleaved:

- ``multinomial``: ``torch.multinomial(w, m, replacement=True)`` (a tensor of indices);
- ``alias``: :meth:`AliasTable.sample` (a tensor; the table is built once, outside the timing);
- ``WeightedRandomSampler``: iterating the sampler (Python ints, as a DataLoader consumes them);
- ``DistributedWeightedSampler``: iterating ours, one rank (Python ints).

``torch.multinomial`` and ``WeightedRandomSampler`` refuse more than 2^24 categories, so at 1e8
only ours run. Memory is measured in a fresh process per variant as the rise of peak resident
memory over the weights themselves, per item: ``build`` (table construction) and ``epoch`` (one
epoch of draws, which includes the Python list a sampler yields from), and the bytes the
variant keeps between epochs. Peaks are read from ``/proc/self/status`` (``VmHWM``, reset between
phases), so this benchmark runs on Linux.

Run: ``python -m benchmarks.sampler [--sizes 1e6 1e7] [--repeats 5]``.

``--sharded N`` instead runs :class:`~reweighting.sharded_sampler.ShardedWeightedSampler` on a
simulated corpus of ``N`` items (e.g. 1e9) in ``--shards`` equal shards whose weights are generated
lazily from a seed per shard (the same law as above). The shard totals (what a scoring run would
write beside each shard) are computed once by generating every shard. Then each of the ``--ranks``
chosen of ``--world`` ranks runs in a fresh process: it draws ``--draws`` indices (enough to touch
every shard of its slice), and reports the rise of peak resident memory over the process before
the sampler existed, the bytes its tables hold, the shards it loaded, the time per draw including
loading and building the item tables, and the time per draw once they are built (a second pass).
The one-level sampler would hold 8 bytes per item on every rank: ``8 N`` bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from torch.utils.data import WeightedRandomSampler

from benchmarks import median_ratio, print_table, reset_peak_rss, status_bytes, time_interleaved, write_results
from reweighting.sampler import AliasTable, DistributedWeightedSampler
from reweighting.sharded_sampler import ShardedWeightedSampler

MULTINOMIAL_LIMIT = 2**24


def make_weights(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(0)) ** 4 + 1e-6


def _consume(iterable) -> None:
    for _ in iterable:
        pass



def _memory_child(variant: str, n: int, m: int, queue) -> None:
    torch.set_num_threads(1)
    weights = make_weights(n)
    if variant == "WeightedRandomSampler":
        weights = weights.double()  # it converts to float64 itself; count that copy as the input
    reset_peak_rss()
    base = status_bytes("VmRSS")
    kept = 0
    if variant == "multinomial":
        draw = lambda: torch.multinomial(weights, m, replacement=True)  # noqa: E731
    elif variant == "alias":
        table = AliasTable(weights)
        kept = table.nbytes
        draw = lambda: table.sample(m)  # noqa: E731
    elif variant == "WeightedRandomSampler":
        sampler = WeightedRandomSampler(weights, m)
        kept = sampler.weights.nbytes
        draw = lambda: _consume(sampler)  # noqa: E731
    else:
        sampler = DistributedWeightedSampler(weights, num_samples=m, num_replicas=1, rank=0)
        kept = sampler._table.nbytes
        draw = lambda: _consume(sampler)  # noqa: E731
    build = status_bytes("VmHWM") - base
    reset_peak_rss()
    draw()
    epoch = status_bytes("VmHWM") - base
    queue.put({"build": build / n, "epoch": epoch / n, "kept": kept / n})


def measure_memory(variant: str, n: int, m: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(variant, n, m, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def bench_size(n: int, repeats: int) -> list[dict]:
    m = min(n, 10**7)
    weights = make_weights(n)
    start = time.process_time()
    table = AliasTable(weights)
    build_cpu = time.process_time() - start
    sampler = DistributedWeightedSampler(weights, num_samples=m, num_replicas=1, rank=0)
    generator = torch.Generator().manual_seed(1)
    variants = {"alias": lambda: table.sample(m, generator=generator),
                "DistributedWeightedSampler": lambda: _consume(sampler)}
    if n <= MULTINOMIAL_LIMIT:
        wrs = WeightedRandomSampler(weights.double(), m, generator=generator)
        variants["multinomial"] = lambda: torch.multinomial(weights, m, replacement=True, generator=generator)
        variants["WeightedRandomSampler"] = lambda: _consume(wrs)
    times = time_interleaved(variants, repeats=repeats, warmup=1)
    rows = []
    for name in variants:
        row = {"n": f"{n:.0e}", "variant": name, "draws": m, "median_s": statistics.median(times[name]),
               "draws_per_s": m / statistics.median(times[name])}
        if n <= MULTINOMIAL_LIMIT:
            row["speedup_vs_WRS"] = 1 / median_ratio(times, name, "WeightedRandomSampler")
            row["speedup_vs_multinomial"] = 1 / median_ratio(times, name, "multinomial")
        row.update({f"bytes_per_item_{k}": v for k, v in measure_memory(name, n, m).items()})
        if name == "alias":
            row["build_cpu_s"] = build_cpu
        rows.append(row)
    return rows


def shard_weights(shard: int, size: int) -> torch.Tensor:
    """The simulated corpus: shard ``shard``'s weights, generated on demand from its own seed."""
    return torch.rand(size, generator=torch.Generator().manual_seed(1000 + shard)) ** 4 + 1e-6


def _sharded_child(items: int, shards: int, world: int, rank: int, totals: list[float], draws: int,
                   queue) -> None:
    torch.set_num_threads(1)
    size = items // shards
    reset_peak_rss()
    base = status_bytes("VmRSS")
    sampler = ShardedWeightedSampler([size] * shards, totals, lambda s: shard_weights(s, size),
                                     num_samples=draws * world, num_replicas=world, rank=rank, chunk_size=1 << 16)
    start = time.perf_counter()
    _consume(sampler)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    _consume(sampler)
    warm = time.perf_counter() - start
    queue.put({"rank": rank, "items_per_rank": items // world, "shards_of_rank": len(sampler.shards),
               "loaded": len(sampler.loaded_shards), "table_MiB": sampler.nbytes / 2**20,
               "peak_rss_rise_MiB": (status_bytes("VmHWM") - base) / 2**20, "bytes_per_rank_item":
               (status_bytes("VmHWM") - base) / (items / world), "us_per_draw_cold": 1e6 * cold / draws,
               "us_per_draw_warm": 1e6 * warm / draws, "one_level_MiB": 8 * items / 2**20})


def bench_sharded(items: int, shards: int, world: int, ranks: list[int], draws: int) -> list[dict]:
    size = items // shards
    start = time.perf_counter()
    totals = [float(shard_weights(s, size).double().sum()) for s in range(shards)]
    print(f"shard totals of {items:.0e} items in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    ctx = mp.get_context("spawn")
    for rank in ranks:
        queue = ctx.Queue()
        proc = ctx.Process(target=_sharded_child, args=(items, shards, world, rank, totals, draws, queue))
        proc.start()
        rows.append(queue.get(timeout=3600))
        proc.join()
        print(f"done rank {rank}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sharded", type=float, default=None, help="items of a simulated sharded corpus")
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0])
    parser.add_argument("--draws", type=int, default=1_000_000, help="draws per rank")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.sharded:
        rows = bench_sharded(int(args.sharded), args.shards, args.world, args.ranks, args.draws)
        print_table(rows, list(rows[0]))
        path = write_results("sharded_sampler", {"rows": rows, "items": int(args.sharded), "shards": args.shards,
                                                 "world": args.world, "draws_per_rank": args.draws})
        print(f"wrote {path}")
        return
    rows = []
    for n in args.sizes:
        rows.extend(bench_size(int(n), args.repeats))
        print(f"done n={int(n):.0e}", flush=True)
    columns = ["n", "variant", "draws", "median_s", "draws_per_s", "speedup_vs_WRS", "speedup_vs_multinomial",
               "build_cpu_s", "bytes_per_item_build", "bytes_per_item_epoch", "bytes_per_item_kept"]
    print_table(rows, columns)
    path = write_results("sampler", {"rows": rows, "repeats": args.repeats, "threads": 1,
                                     "torch": torch.__version__})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
