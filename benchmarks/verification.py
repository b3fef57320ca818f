"""The cost of the self-influence engine's run-time verification, as ratios in one run.

Each variant is one PRESENCE-style step without the optimizer: a captured forward, ``norms`` and
``weighted_backward``. Timed interleaved on the ``presence`` study's GPT (``TinyGPT``, 2 layers,
width 128, tied embeddings) and on an MLP (784-512-512-10):

- ``off``: ``verify=False`` (the baseline);
- ``steady``: ``verify=True`` on a call that does not verify (same parameters, modules and layout
  as the verified first call): what every later call pays for the layout key;
- ``verified``: a call that verifies (``verify_every=1``), i.e. what the first call and each call
  after a change pay: ``verify_units`` (2) extra backward passes and the comparison.

``amortised N`` is the mean cost per call over ``N`` calls of which one verifies,
``(verified + (N - 1) steady) / (N off)``, from the medians.

Run: ``python -m benchmarks.verification [--repeats 10] [--threads 1] [--batch 16] [--seq 64]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import median_ratio, print_table, time_interleaved, write_results
from reweighting.influence import SelfInfluence
from reweighting.studies.lm import GPTConfig, TinyGPT


def gpt_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def step(si: SelfInfluence, model: nn.Module, loss_fn, inputs: tuple) -> None:
    with si.capture():
        losses = loss_fn(model, *inputs)
    si.norms(losses)
    si.weighted_backward(torch.full_like(losses, 1.0 / losses.shape[0]).detach())
    model.zero_grad(set_to_none=True)


def bench(name: str, model: nn.Module, loss_fn, inputs: tuple, repeats: int, **kw) -> dict:
    engines = {"off": SelfInfluence(model, verify=False, **kw), "steady": SelfInfluence(model, **kw),
               "verified": SelfInfluence(model, verify_every=1, **kw)}
    step(engines["steady"], model, loss_fn, inputs)  # its verified first call, outside the timing
    times = time_interleaved({k: (lambda si=si: step(si, model, loss_fn, inputs)) for k, si in engines.items()},
                             repeats=repeats, warmup=1)
    assert engines["steady"].verifications == 1, "the steady engine verified again: its layout key is unstable"
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "off ms": 1e3 * med["off"], "steady x": median_ratio(times, "steady", "off"),
           "verified x": median_ratio(times, "verified", "off")}
    for n in (10, 100, 1000):
        row[f"amortised {n} x"] = (med["verified"] + (n - 1) * med["steady"]) / (n * med["off"])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt = TinyGPT(GPTConfig(context=args.seq))
    tokens = torch.randint(0, gpt.cfg.vocab_size, (args.batch, args.seq + 1))
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(4 * args.batch, 784), torch.randint(0, 10, (4 * args.batch,))
    rows = [bench("GPT (tied)", gpt, gpt_loss, (tokens,), args.repeats, broadcast=["pos"]),
            bench("MLP", mlp, mlp_loss, (x, y), args.repeats)]
    columns = ["model", "off ms", "steady x", "verified x", "amortised 10 x", "amortised 100 x", "amortised 1000 x"]
    print_table(rows, columns)
    write_results("verification", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
