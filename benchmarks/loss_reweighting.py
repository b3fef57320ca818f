"""Overhead of LossReweighter on a GPT training step, against the same step with a plain mean loss.

1. One process: a TinyGPT training step (forward, backward, AdamW) with ``loss.mean()`` against the
   same step with ``LossReweighter`` (min-max and rank normalisation), same model and batch.
2. Two gloo ranks under DDP: the same comparison, where the reweighter adds one collective per
   step (an all_gather of every rank's losses; the weights are then computed locally, for every
   normalisation); and the weight computation alone against one scalar all-reduce.

Run: ``python -m benchmarks.loss_reweighting`` (writes ``bench-results/loss_reweighting.json``).
"""

from __future__ import annotations

import statistics

import torch

from benchmarks import median_ratio, print_table, time_interleaved, write_results

BATCH, SEQ, DIM, LAYERS = 16, 128, 128, 2
REPEATS = 15
REPEATS_DDP = 25  # two ranks share the loaded CPUs: their step times are noisier


def _setup(seed: int = 0):
    from reweighting.studies.lm import GPTConfig, TinyGPT, pack_sequences, stdlib_documents

    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(context=SEQ, dim=DIM, layers=LAYERS, heads=4))
    train, _ = stdlib_documents(max_documents=20)
    rows = pack_sequences(train, SEQ, max_sequences=BATCH * 4)
    return model, rows


def _step_fns(model, batch, ddp_model=None) -> dict:
    """One training step per variant; they share the model and batch."""
    import reweighting as rw

    net = ddp_model if ddp_model is not None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reweighters = {"linupper minmax": rw.LossReweighter("linupper", temperature=0.4),
                   "linupper rank": rw.LossReweighter("linupper", temperature=0.4, normalize="rank")}

    def per_sample():
        logits = net(batch[:, :-1])
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        return rw.sequence_loss(token)

    def step(loss_fn):
        def run():
            loss = loss_fn(per_sample())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    fns = {"plain mean": step(lambda loss: loss.mean())}
    for name, r in reweighters.items():
        fns[name] = step(lambda loss, r=r: r(loss))
    fns["linupper minmax, checks off"] = step(lambda loss: _unchecked(reweighters["linupper minmax"], loss))
    return fns


def _rows(times: dict, baseline: str) -> list[dict]:
    return [{"variant": name, "median ms": 1e3 * statistics.median(t),
             "ratio to baseline": median_ratio(times, name, baseline)} for name, t in times.items()]


def single_process() -> list[dict]:
    torch.set_num_threads(1)
    model, rows = _setup()
    times = time_interleaved(_step_fns(model, rows[:BATCH]), repeats=REPEATS, warmup=3)
    return _rows(times, "plain mean")


def _unchecked(fn, losses):
    """``fn(losses)`` without NaN checks: fewer host syncs and collectives."""
    import reweighting as rw

    with rw.checks(False):
        return fn(losses)


def _two_rank_worker(rank: int, world: int) -> dict:
    import reweighting as rw

    model, rows = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = BATCH // world
    batch = rows[rank * half : (rank + 1) * half]
    step_times = time_interleaved(_step_fns(model, batch, ddp), repeats=REPEATS_DDP, warmup=3)
    losses = torch.rand(half) * 3
    minmax = rw.LossReweighter("linupper")
    ranked = rw.LossReweighter("linupper", normalize="rank")
    quantiled = rw.LossReweighter("linupper", normalize="quantile")
    one = torch.ones(())
    weight_times = time_interleaved({
        "one all_reduce (reference)": lambda: torch.distributed.all_reduce(one.clone()),
        "weights minmax": lambda: minmax.weights(losses),
        "weights rank": lambda: ranked.weights(losses),
        "weights quantile": lambda: quantiled.weights(losses),
        "weights minmax, checks off": lambda: _unchecked(minmax.weights, losses),
    }, repeats=50, warmup=5, inner=10)
    return {"steps": step_times, "weights": weight_times}


def two_ranks() -> tuple[list[dict], list[dict]]:
    from reweighting.testing import launch

    result = launch(_two_rank_worker, 2, timeout=600)[0]
    steps = _rows(result["steps"], "plain mean")
    weights = [{"variant": name, "median us": 1e6 * statistics.median(t)} for name, t in result["weights"].items()]
    return steps, weights


def main() -> None:
    columns = ["variant", "median ms", "ratio to baseline"]
    print(f"### one process: TinyGPT step (batch {BATCH} x {SEQ} bytes, dim {DIM}, {LAYERS} layers), 1 thread\n")
    single = single_process()
    print_table(single, columns)
    print("\n### two gloo ranks, DDP, batch split in halves\n")
    steps, weights = two_ranks()
    print_table(steps, columns)
    ratios = {row["variant"]: row["ratio to baseline"] for row in steps}
    print("\nLossReweighter step under DDP, 2 gloo ranks, x a plain mean: "
          + ", ".join(f"{name} {ratios[name]:.3f}x" for name in ratios if name != "plain mean"))
    print()
    print_table(weights, ["variant", "median us"])
    path = write_results("loss_reweighting", {
        "config": {"batch": BATCH, "seq": SEQ, "dim": DIM, "layers": LAYERS, "repeats": REPEATS,
                   "repeats_ddp": REPEATS_DDP},
        "single_process": single, "two_ranks_step": steps, "two_ranks_weights": weights,
    })
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
