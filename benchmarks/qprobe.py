"""Q-probe speed: features read during sampling, fitting a probe, selecting among k = 48.

1. ``sample_with_features`` (generate with ``output_hidden_states`` and the feature read-out)
   against plain ``generate`` with the same settings: the overhead should be at most 5%. The model
   is SmolLM2-135M-Instruct when its converted weights are cached (``reweighting reproduce
   qprobe-smollm2`` or ``load_smollm2`` converts them), otherwise a small random Llama.
2. ``fit_probe`` on 100,000 samples of dimension 576 with the paper's defaults (150 epochs, batches
   of 1000), against the same number of steps of a bare PyTorch loop (linear layer, AdamW, MSE on
   shuffled batches): the target is under 10 s of CPU.
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


def bench_fit(quick: bool) -> dict:
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

    rows = {}
    for name, fn in {
        "bare PyTorch loop (mse)": bare_loop,
        "fit_probe mse": lambda: fit_probe(x, r, groups, "mse", epochs=epochs, progress=False),
        "fit_probe pg": lambda: fit_probe(x, r, groups, "pg", epochs=epochs, progress=False),
    }.items():
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        rows[name] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    return {"samples": n, "dim": dim, "epochs": epochs, "batch": 1000, "threads": torch.get_num_threads(), "runs": rows}


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
    bare = fit_result["runs"]["bare PyTorch loop (mse)"]["cpu_s"]
    for name, run in fit_result["runs"].items():
        rows.append({"benchmark": f"fit 100000 x 576, {fit_result['epochs']} epochs: {name}", "median": run["cpu_s"],
                     "unit": "CPU s (one run)", "ratio to baseline": run["cpu_s"] / bare})
    rows.append({"benchmark": f"sampling with features ({feature_result['model']})",
                 "median": statistics.median(feature_result["times"]["generate + features"]), "unit": "s / call",
                 "ratio to baseline": feature_result["overhead_ratio"]})
    print_table(rows, ["benchmark", "median", "unit", "ratio to baseline"])
    path = write_results("qprobe", {"quick": args.quick, "select": select_result, "fit": fit_result,
                                    "features": feature_result, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
