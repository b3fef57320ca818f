"""Q-probe speed: features read during sampling, fitting a probe, selecting among k = 48.

1. ``sample_with_features`` (generate with ``output_hidden_states`` and the feature read-out)
   against plain ``generate`` with the same settings: the overhead should be at most 5%. The model
   is SmolLM2-135M-Instruct when its converted weights are cached (``reweighting reproduce
   qprobe-smollm2`` or ``load_smollm2`` converts them), otherwise a small random Llama.
2. ``fit_probe`` on 100,000 samples of dimension 576 with the paper's defaults (150 epochs, batches
   of 1000), against the previous implementation (kept here as :func:`legacy_fit_probe`; the same
   seed gives the same probe up to rounding, which the run reports) and a bare PyTorch loop doing
   the same steps (linear layer, AdamW, MSE on shuffled batches): the target is under 10 s of CPU.
3. ``select`` among k = 48 candidates for 1,000 prompts against ``torch.multinomial(softmax)``:
   the target is well under 1 ms per prompt.

Run with ``python -m benchmarks.qprobe [--quick]``; writes ``bench-results/qprobe.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import median_ratio, print_table, time_interleaved, write_results


def _model():
    from reweighting.qprobe.smollm2 import MODEL_NAME, cache_dir

    if any(cache_dir().glob(f"{MODEL_NAME}-*/config.json")):
        from reweighting.qprobe.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(progress=False)
        return model, tokenizer, MODEL_NAME, 20, True
    from reweighting.qprobe.tiny import tiny_llama

    model, tokenizer = tiny_llama(hidden_size=256, intermediate_size=768, layers=8, heads=4, kv_heads=2)
    return model, tokenizer, "random Llama (8 x 256)", 5, False


def bench_features(quick: bool) -> dict:
    from reweighting.qprobe.features import sample_with_features

    model, tokenizer, name, layer, chat = _model()
    prompts = [f"What is {a} plus {b}? Reply with only the number." for a, b in ((3, 4), (6, 2), (5, 5), (9, 1))]
    k, new_tokens = 4, 16
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts] if chat else prompts
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def plain():
        torch.manual_seed(0)
        model.generate(**enc, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       num_return_sequences=k, pad_token_id=pad)

    def with_features():
        # min_new_tokens keeps both variants generating the same number of tokens.
        model.generation_config.min_new_tokens = new_tokens
        try:
            sample_with_features(model, tokenizer, prompts, k, layer=layer, max_new_tokens=new_tokens, chat=chat,
                                 batch_size=len(prompts), seed=0, progress=False)
        finally:
            model.generation_config.min_new_tokens = None

    times = time_interleaved({"plain generate": plain, "generate + features": with_features},
                             repeats=3 if quick else 7, warmup=1)
    return {"model": name, "sequences": len(prompts) * k, "new_tokens": new_tokens, "times": times,
            "overhead_ratio": median_ratio(times, "generate + features", "plain generate")}


def legacy_fit_probe(x: torch.Tensor, r: torch.Tensor, groups: torch.Tensor, objective: str, *, epochs: int,
                     batch_size: int = 1000, group_size: int = 10, lr: float = 5e-5, seed: int = 0) -> torch.Tensor:
    """The previous ``fit_probe`` (linear probe, ``mse`` or ``pg``), kept as this benchmark's baseline:
    ``var_mean`` standardisation, a row-wise finiteness check, one gather of the whole data set per
    epoch, autograd and ``torch.optim.AdamW`` per step. Returns the weights ``[D + 1]``."""
    from reweighting.checks import checks
    from reweighting.qprobe import QProbe, chunk_groups, mse_loss, pg_loss

    n, dim = x.shape
    if bool((~torch.isfinite(x).all(dim=1)).any()):
        raise ValueError("features has NaN or infinite values")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = QProbe(dim)
    var, mean = torch.var_mean(x, dim=0, correction=0)
    std = torch.where(var.sqrt() > 1e-6, var.sqrt(), torch.ones_like(var))
    xs = (x - mean) / std
    head = probe.net.train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    buffer = None
    with checks(False):
        for _ in range(epochs):
            if objective == "pg":
                table = chunk_groups(groups, group_size, generator)
                order = table.clamp(min=0).reshape(-1)
            else:
                order = torch.randperm(n, generator=generator)
            if buffer is None or buffer.shape[0] != order.shape[0]:
                buffer = torch.empty((order.shape[0], dim))
            torch.index_select(xs, 0, order, out=buffer)
            shuffled_r = r[order]
            if objective == "pg":
                per = (batch_size // group_size) * group_size
                pieces = zip(buffer.split(per), shuffled_r.split(per), (table >= 0).split(batch_size // group_size))
            else:
                pieces = zip(buffer.split(batch_size), shuffled_r.split(batch_size), [None] * n)
            for xb, rb, valid in pieces:
                if objective == "pg":
                    loss = pg_loss(head(xb).reshape(valid.shape), rb.reshape(valid.shape), valid)
                else:
                    loss = mse_loss(head(xb).squeeze(-1), rb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return torch.cat([probe.net[0].weight.detach().reshape(-1), probe.net[0].bias.detach()])


def bench_fit(quick: bool) -> dict:
    """One run of each (a full run is tens of CPU seconds), in interleaved order, CPU seconds."""
    from reweighting.qprobe import fit_probe

    n, dim, epochs = 100_000, 576, (10 if quick else 150)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    r = (x[:, 0] + torch.randn(n, generator=g) > 1).float()
    groups = torch.arange(n) // 48

    def bare_loop():
        torch.manual_seed(0)
        layer = torch.nn.Linear(dim, 1)
        opt = torch.optim.AdamW(layer.parameters(), lr=5e-5, weight_decay=0.0)
        for _ in range(epochs):
            for idx in torch.randperm(n).split(1000):
                loss = torch.nn.functional.mse_loss(layer(x[idx]).squeeze(-1), r[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def weights(probe):
        return torch.cat([probe.net[0].weight.detach().reshape(-1), probe.net[0].bias.detach()])

    rows, results = {}, {}
    for name, fn in {
        "previous fit_probe mse": lambda: legacy_fit_probe(x, r, groups, "mse", epochs=epochs),
        "fit_probe mse": lambda: weights(fit_probe(x, r, groups, "mse", epochs=epochs, progress=False)),
        "previous fit_probe pg": lambda: legacy_fit_probe(x, r, groups, "pg", epochs=epochs),
        "fit_probe pg": lambda: weights(fit_probe(x, r, groups, "pg", epochs=epochs, progress=False)),
        "bare PyTorch loop (mse)": bare_loop,
    }.items():
        cpu, wall = time.process_time(), time.perf_counter()
        results[name] = fn()
        rows[name] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    # Same seed, same batches: the new probe must equal the previous one up to float rounding. The
    # bias of L_PG is not identified (each group's softmax ignores a shift), so only w is compared.
    agreement = {obj: float((results[f"fit_probe {obj}"] - results[f"previous fit_probe {obj}"])[:dim].abs().max())
                 for obj in ("mse", "pg")}
    scale = {obj: float(results[f"previous fit_probe {obj}"][:dim].abs().max()) for obj in ("mse", "pg")}
    return {"samples": n, "dim": dim, "epochs": epochs, "batch": 1000, "threads": torch.get_num_threads(),
            "runs": rows, "max_abs_weight_difference": agreement, "max_abs_weight": scale,
            "load_average": _load()}


def _load() -> list[float] | None:
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def bench_select(quick: bool) -> dict:
    from reweighting.qprobe import select

    prompts, k = 1000, 48
    q = torch.randn(prompts, k)
    g = torch.Generator().manual_seed(0)

    def baseline():
        torch.multinomial(torch.softmax(q / 0.1, dim=-1), 1, generator=g)

    def ours():
        select(q, 0.1, g)

    times = time_interleaved({"multinomial(softmax)": baseline, "select": ours}, repeats=10 if quick else 30,
                             warmup=3)
    return {"prompts": prompts, "k": k, "times": times,
            "ms_per_prompt": 1e3 * statistics.median(times["select"]) / prompts,
            "ratio": median_ratio(times, "select", "multinomial(softmax)")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and 10 epochs instead of 150")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    select_result = bench_select(args.quick)
    fit_result = bench_fit(args.quick)
    feature_result = bench_features(args.quick)
    rows = [
        {"benchmark": f"select, k = 48 ({select_result['prompts']} prompts)", "median": select_result["ms_per_prompt"],
         "unit": "ms / prompt", "ratio to baseline": select_result["ratio"]},
    ]
    runs = fit_result["runs"]
    for obj in ("mse", "pg"):
        old, new = runs[f"previous fit_probe {obj}"]["cpu_s"], runs[f"fit_probe {obj}"]["cpu_s"]
        rows.append({"benchmark": f"fit 100000 x 576, {fit_result['epochs']} epochs, {obj}: fit_probe vs previous",
                     "median": new, "unit": "CPU s (one run)", "ratio to baseline": new / old})
    bare = runs["bare PyTorch loop (mse)"]["cpu_s"]
    rows.append({"benchmark": f"fit 100000 x 576, {fit_result['epochs']} epochs, mse: fit_probe vs bare loop",
                 "median": runs["fit_probe mse"]["cpu_s"], "unit": "CPU s (one run)",
                 "ratio to baseline": runs["fit_probe mse"]["cpu_s"] / bare})
    rows.append({"benchmark": f"sampling with features ({feature_result['model']})",
                 "median": statistics.median(feature_result["times"]["generate + features"]), "unit": "s / call",
                 "ratio to baseline": feature_result["overhead_ratio"]})
    print_table(rows, ["benchmark", "median", "unit", "ratio to baseline"])
    path = write_results("qprobe", {"quick": args.quick, "select": select_result, "fit": fit_result,
                                    "features": feature_result, "rows": rows})
    print(f"fit: max |w_new - w_previous| {fit_result['max_abs_weight_difference']} (max |w| "
          f"{fit_result['max_abs_weight']}); load average {fit_result['load_average']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
