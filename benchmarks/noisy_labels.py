"""Overhead of RENT, DWS and RW training steps against a plain cross-entropy step, same model and batch.

Two models, one thread:

1. the ``noisy-labels`` study's MLP on a digits-sized batch (64 x 64 features): a step of well under
   a millisecond, so the fixed cost of the weights (softmax, validation of ``T`` with one host
   read-back, Dirichlet draws, resampling) shows at its largest;
2. a small CNN on CIFAR-sized inputs (128 x 3 x 32 x 32), the paper's setting.

A step is forward, loss, backward and an Adam update. ``T`` is a 10-class symmetric matrix. The
"checks off" rows use ``reweighting.set_checks(False)`` (value validation skipped).

Run: ``python -m benchmarks.noisy_labels`` (writes ``bench-results/noisy_labels.json``).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from benchmarks import median_ratio, print_table, time_interleaved, write_results

REPEATS = 15
CLASSES = 10


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    from reweighting.studies.noisy_labels import MLP

    return MLP(128), torch.rand(64, 64)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, CLASSES),
    )
    return model, torch.rand(128, 3, 32, 32)


def _step_fns(model: nn.Module, x: torch.Tensor) -> dict:
    import reweighting as rw
    from reweighting.noisy_labels import noisy_label_loss, symmetric_transition

    y = torch.randint(0, CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    T = symmetric_transition(CLASSES, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step(loss: str, checks: bool = True):
        def run():
            with rw.checks(checks):
                value = noisy_label_loss(loss, model(x), y, T, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        return run

    return {"CE": step("ce"), "RW": step("reweight"), "DWS (alpha 10, M = B)": step("dws"), "RENT": step("rent"),
            "RENT, checks off": step("rent", checks=False), "DWS, checks off": step("dws", checks=False)}


def measure(make) -> list[dict]:
    torch.manual_seed(0)
    model, x = make()
    times = time_interleaved(_step_fns(model, x), repeats=REPEATS, warmup=3, inner=5 if x.dim() == 2 else 1)
    return [{"variant": name, "median ms": 1e3 * statistics.median(t), "ratio to CE": median_ratio(times, name, "CE")}
            for name, t in times.items()]


def main() -> None:
    torch.set_num_threads(1)
    columns = ["variant", "median ms", "ratio to CE"]
    results = {}
    for name, make, label in [("mlp", _mlp, "study MLP 64-128-128-10, batch 64"),
                              ("cnn", _cnn, "small CNN, batch 128 x 3 x 32 x 32")]:
        print(f"\n### {label}, 1 thread\n")
        results[name] = measure(make)
        print_table(results[name], columns)
    path = write_results("noisy_labels", {"config": {"repeats": REPEATS, "classes": CLASSES, "threads": 1}, **results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
