"""TIW-DSM training step against a plain DSM step: same score model, same batch, one run.

A TIW-DSM step adds a forward pass of the discriminator and a backward pass to its input
(``grad_x log w_t``) to the DSM step's forward, backward and optimiser update. The
discriminator is usually smaller than the score model (the study's is); the ``same size`` row
shows the worst case, a discriminator as large as the score model.

    python -m benchmarks.tiw_dsm
"""

from __future__ import annotations

import platform

import torch

from benchmarks import median_ratio, print_table, time_interleaved, write_results

CASES = [
    # name, data dim, score hidden, discriminator hidden, batch
    ("2-D points, plain eps MLP", 2, 128, 128, 256),
    # the study's own score model: EDM-preconditioned denoiser on 64 Fourier features, x0 loss
    ("2-D points (study model)", 2, 128, 128, 256),
    ("8x8 digits (study)", 64, 256, 64, 256),
    ("64-d, disc 1/4 width", 64, 512, 128, 256),
    ("64-d, same size", 64, 512, 512, 256),
]


def _step_fns(dim: int, hidden: int, disc_hidden: int, batch: int, study_model: bool = False):
    from reweighting.diffusion import (
        TimeDependentDiscriminator,
        TimeDependentRatio,
        TimeMLP,
        VPCosine,
        dsm_loss,
        tiw_dsm_loss,
    )

    schedule, prediction, loss_weight = VPCosine(), "eps", None
    torch.manual_seed(0)
    model = TimeMLP(dim, hidden=hidden, depth=3)
    if study_model:
        from reweighting.studies import tiw_dsm

        schedule = tiw_dsm.make_study_schedule(tiw_dsm.FULL)
        model = tiw_dsm.make_score_model(tiw_dsm.FULL, dim, schedule, seed=0)
        prediction, loss_weight = tiw_dsm.FULL.prediction, model.loss_weight
    disc = TimeDependentDiscriminator(TimeMLP(dim, 1, hidden=disc_hidden, depth=3, squeeze=True)).eval()
    ratio = TimeDependentRatio(disc, reference_fraction=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, dim)
    g = torch.Generator().manual_seed(0)

    def dsm_step():
        loss, _ = dsm_loss(model, x0, schedule, prediction=prediction, generator=g, loss_weight=loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def tiw_step():
        loss, _ = tiw_dsm_loss(model, x0, schedule, ratio, prediction=prediction, generator=g, loss_weight=loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"DSM": dsm_step, "TIW-DSM": tiw_step}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, dim, hidden, disc_hidden, batch in CASES:
        fns = _step_fns(dim, hidden, disc_hidden, batch, study_model=name.endswith("(study model)"))
        times = time_interleaved(fns, repeats=30, warmup=5, inner=5)
        rows.append({
            "case": name,
            "batch": batch,
            "DSM ms": 1000 * sorted(times["DSM"])[len(times["DSM"]) // 2],
            "TIW-DSM ms": 1000 * sorted(times["TIW-DSM"])[len(times["TIW-DSM"]) // 2],
            "TIW-DSM / DSM": median_ratio(times, "TIW-DSM", "DSM"),
        })
    print_table(rows, ["case", "batch", "DSM ms", "TIW-DSM ms", "TIW-DSM / DSM"])
    path = write_results("tiw_dsm", {
        "target": "TIW-DSM step <= 1.6x a DSM step",
        "threads": 1,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
