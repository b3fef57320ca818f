"""Field run of :class:`~reweighting.influence.SelfInfluence`: many configurations, each counted as
exact, refused (a clear error of ours), silent (numbers that differ from autograd, no error) or
crashed (an error from elsewhere).

Configurations: Hugging Face families built from their configs with tiny random weights (nothing
downloaded) in several settings (a padded batch, a batch whose size equals its length, a layer
frozen after the engine was made, float64, a subset of modules); torch layers with their options;
models whose samples interact; packed rows with and without attention across documents.

The reference of each unit ``u`` (a sample or a document) is autograd's gradient of ``l_u`` on
the same batched forward, over the engine's parameters; a result is exact when the norms of all
units and the weighted update agree to ``1e-3`` (relative to the largest). A configuration whose
samples interact has no per-sample gradient to give: a number for it counts as silent.

Run: ``python -m benchmarks.field_self_influence [--only SUBSTRING]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import write_results
from reweighting.influence import SelfInfluence

TOL = 1e-3
V = 37


# -- outcome ---------------------------------------------------------------------------------------

def outcome(model, loss_fn, inputs, kw=None, *, interacting=False, after=None, documents=None) -> tuple[str, str]:
    """Run the engine and the reference on the same forward; classify."""
    kw = kw or {}
    try:
        si = SelfInfluence(model, **kw)
        if after is not None:
            after(model)  # a change made after the engine was built (freezing a layer)
        with si.capture():
            losses = loss_fn(model, *inputs)
        params = si.parameters
        ref = [torch.autograd.grad(losses[u], params, retain_graph=True, allow_unused=True)
               for u in range(losses.shape[0])]
        ref = [[torch.zeros_like(p) if g is None else g for g, p in zip(r, params)] for r in ref]
        norms = si.norms(losses, documents=documents, retain_graph=True)
        w = torch.softmax(torch.linspace(-1, 1, losses.shape[0]), 0).to(losses.dtype)
        for p in model.parameters():
            p.grad = None
        si.weighted_backward(w)
    except Exception as error:  # noqa: BLE001 - every failure is classified
        text = f"{type(error).__name__}: {error}"
        ours = type(error).__module__.startswith("reweighting") or _raised_by_us(error)
        return ("refused" if ours else "crashed"), text[:300]
    if interacting:
        return "silent", "a number for samples that interact"
    want = torch.stack([sum(g.double().square().sum() for g in r) for r in ref])
    err = float((norms.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))
    if err > TOL:
        return "silent", f"norms off by {err:.3g}"
    for j, p in enumerate(params):
        upd = sum(float(w[u]) * ref[u][j].double() for u in range(len(ref)))
        got = torch.zeros_like(upd) if p.grad is None else p.grad.double()
        scale = max(float(upd.abs().max()), 1e-12)
        if float((got - upd).abs().max()) > TOL * scale and float(upd.abs().max()) > 1e-9:
            return "silent", f"update of a parameter off by {float((got - upd).abs().max()) / scale:.3g}"
    return "exact", ""


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "/reweighting/" in last


# -- Hugging Face families ----------------------------------------------------------------------------

def _hf_families():
    import transformers as t

    small = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    fam = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**small)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**small, head_dim=8)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**small)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**small)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**small, head_dim=8)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**small, head_dim=8)),
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**small, num_local_experts=2)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**small)),
        "olmo": lambda: t.OlmoForCausalLM(t.OlmoConfig(**small)),
        "starcoder2": lambda: t.Starcoder2ForCausalLM(t.Starcoder2Config(**small)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  max_position_embeddings=64)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64,
                                                    word_embed_proj_dim=32, pad_token_id=0)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       max_position_embeddings=64)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=V, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                                                              num_heads=4, decoder_start_token_id=0)),
    }
    return fam


def _user_kwargs(name: str, model: nn.Module) -> dict:
    """What a user following the engine's messages passes: position tables in broadcast=, T5's
    relative bias and custom embedding subclasses in reference=."""
    broadcast, reference = [], []
    for n, m in model.named_modules():
        if "relative_attention_bias" in n:
            reference.append(n)
        elif any(k in n.split(".")[-1] for k in ("wpe", "position_embeddings", "embed_positions")):
            if type(m) is nn.Embedding:
                broadcast.append(n)
            else:
                reference.append(n)
    return {"broadcast": broadcast, "reference": reference}


def _hf_loss(kind: str):
    def causal(model, ids, mask):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].to(tok.dtype)
        return (tok * m).sum(1) / m.sum(1)

    def masked(model, ids, mask):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        tok = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        m = mask.to(tok.dtype)
        return (tok * m).sum(1) / m.sum(1)

    def seq2seq(model, ids, mask):
        labels = ids.flip(1)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)

    return {"bert": masked, "t5": seq2seq}.get(kind, causal)


def _batch(b: int, t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        mask[1, t - 2:] = 0
    return ids * mask, mask


def hf_configs():
    try:
        families = _hf_families()
    except ImportError:
        return []
    out = []
    for name, make in families.items():
        loss = _hf_loss(name)

        def build(make=make, dtype=torch.float32):
            torch.manual_seed(0)
            with contextlib.redirect_stderr(io.StringIO()):
                model = make()
            model.config._attn_implementation = "eager"
            return model.to(dtype).eval()

        def run(build=build, loss=loss, name=name, b=3, t=7, dtype=torch.float32, after=None, subset=False):
            model = build(dtype=dtype)
            kw = _user_kwargs(name, model)
            if subset:
                last = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))][-4:]
                kw.update(modules=last, bookkeeping=False)
            return outcome(model, loss, _batch(b, t), kw, after=after)

        out += [(f"hf/{name}/padded", run),
                (f"hf/{name}/B==T", lambda run=run: run(b=4, t=4)),
                (f"hf/{name}/frozen-embeddings-later", lambda run=run: run(
                    after=lambda m: m.get_input_embeddings().requires_grad_(False))),
                (f"hf/{name}/float64", lambda run=run: run(dtype=torch.float64)),
                (f"hf/{name}/last-modules", lambda run=run: run(subset=True))]
    return out


# -- torch layers, interacting samples, packed rows ---------------------------------------------------

def _reg(model, x, y):
    out = model(x)
    return ((out - y) ** 2).flatten(1).sum(1)


def layer_configs():
    def case(name, make, x_shape, kw=None, interacting=False, wrap=None):
        def run():
            torch.manual_seed(0)
            layer = make()
            model = nn.Sequential(layer) if wrap is None else wrap(layer)
            x = torch.randn(*x_shape)
            with torch.no_grad():
                y = torch.randn_like(model(x).float() if not isinstance(model(x), tuple) else model(x)[0])
            return outcome(model, _reg, (x, y), kw, interacting=interacting)
        return (f"torch/{name}", run)

    class Head(nn.Module):  # keeps the first output of layers that return tuples
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            out = self.layer(x)
            return out[0] if isinstance(out, tuple) else out

    class SelfAttn(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, x, x, need_weights=False)[0]

    class SeqFirst(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.transpose(0, 1)).transpose(0, 1)

    class Centre(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.head = layer, nn.Linear(4, 2)

        def forward(self, x):
            h = self.layer(x)
            return self.head(h - h.mean(0))

    out = []
    for bias in (True, False):
        out.append(case(f"Linear(bias={bias})", lambda bias=bias: nn.Linear(4, 3, bias=bias), (5, 4)))
        out.append(case(f"Linear(bias={bias}) on [B,T,d]", lambda bias=bias: nn.Linear(4, 3, bias=bias), (5, 6, 4)))
    out.append(case("Linear seq-first T!=B", lambda: nn.Linear(4, 3), (5, 6, 4), wrap=SeqFirst))
    out.append(case("Linear seq-first T==B", lambda: nn.Linear(4, 3), (5, 5, 4), wrap=SeqFirst))
    out.append(case("Linear on flattened [B*T,d]", lambda: nn.Linear(4, 3), (5, 6, 4),
                    wrap=lambda layer: _Flat(layer)))
    for k, s, p, d, g in [(3, 1, 0, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 1), (3, 1, 1, 1, 2)]:
        out.append(case(f"Conv1d(k={k},s={s},p={p},d={d},g={g})",
                        lambda k=k, s=s, p=p, d=d, g=g: nn.Conv1d(4, 4, k, stride=s, padding=p, dilation=d, groups=g),
                        (3, 4, 9)))
        out.append(case(f"Conv2d(k={k},s={s},p={p},d={d},g={g})",
                        lambda k=k, s=s, p=p, d=d, g=g: nn.Conv2d(4, 4, k, stride=s, padding=p, dilation=d, groups=g),
                        (3, 4, 7, 7)))
    out.append(case("Conv1d(padding_mode=reflect)", lambda: nn.Conv1d(4, 2, 3, padding=1, padding_mode="reflect"),
                    (3, 4, 8)))
    for affine in (True, False):
        out.append(case(f"LayerNorm(affine={affine})",
                        lambda a=affine: _WithHead(nn.LayerNorm(4, elementwise_affine=a)), (5, 6, 4)))
    out.append(case("RMSNorm", lambda: _WithHead(nn.RMSNorm(4)), (5, 6, 4)))
    out.append(case("GroupNorm", lambda: _WithHead(nn.GroupNorm(2, 4)), (5, 4), kw={"unsupported": "reference"}))
    out.append(case("GroupNorm without reference", lambda: _WithHead(nn.GroupNorm(2, 4)), (5, 4)))
    out.append(case("BatchNorm1d train", lambda: _WithHead(nn.BatchNorm1d(4)), (5, 4)))
    out.append(case("BatchNorm1d eval", lambda: _WithHead(nn.BatchNorm1d(4)).eval(), (5, 4),
                    kw={"unsupported": "reference"}))
    out.append(case("BatchNorm1d no stats eval", lambda: _WithHead(
        nn.BatchNorm1d(4, affine=False, track_running_stats=False)).eval(), (5, 4)))
    for kw in ({}, {"bias": False}, {"kdim": 4, "vdim": 4}):
        out.append(case(f"MHA batch_first {kw}", lambda kw=kw: nn.MultiheadAttention(4, 2, batch_first=True, **kw),
                        (3, 5, 4), wrap=SelfAttn))
    out.append(case("MHA seq-first", lambda: nn.MultiheadAttention(4, 2), (5, 3, 4), wrap=SelfAttn))
    out.append(case("TransformerEncoderLayer batch_first", lambda: nn.TransformerEncoderLayer(
        4, 2, 8, dropout=0.0, batch_first=True), (3, 5, 4), kw={"unsupported": "reference"}))
    out.append(case("TransformerEncoderLayer seq-first T==B", lambda: nn.TransformerEncoderLayer(
        4, 2, 8, dropout=0.0), (4, 4, 4), kw={"unsupported": "reference"}))
    out.append(case("GRU", lambda: nn.GRU(4, 3, batch_first=True), (3, 5, 4), wrap=Head))
    out.append(case("GRU reference", lambda: nn.GRU(4, 3, batch_first=True), (3, 5, 4), wrap=Head,
                    kw={"unsupported": "reference"}))
    out.append(case("centred over the batch", lambda: nn.Linear(3, 4), (5, 3), wrap=Centre, interacting=True))
    out.append(case("Embedding(padding_idx=0)", lambda: _Tokens(nn.Embedding(9, 4, padding_idx=0)), (4, 6)))
    out.append(case("Embedding(max_norm)", lambda: _Tokens(nn.Embedding(9, 4, max_norm=1.0)), (4, 6)))
    out.append(case("Embedding(scale_grad_by_freq)", lambda: _Tokens(nn.Embedding(9, 4, scale_grad_by_freq=True)),
                    (4, 6)))
    return out


class _WithHead(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)))


class _Flat(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        b, t, d = x.shape
        return self.layer(x.reshape(b * t, d)).reshape(b, t, -1)


class _Tokens(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(4, 1)

    def forward(self, x):
        ids = (x.abs() * 3).long().clamp(max=8)
        return self.head(self.emb(ids)).squeeze(-1)


def packed_configs():
    from tests.influence import models as M

    def doc_losses(model, tokens, documents):
        logits = model(tokens[:, :-1])
        tok = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        inside = (documents[:, 1:] == documents[:, :-1]) & (documents[:, :-1] >= 0)
        n = int(documents.max()) + 1
        ids = torch.where(inside, documents[:, :-1], n).reshape(-1)
        sums = tok.new_zeros(n + 1).index_add(0, ids, tok.reshape(-1))[:n]
        counts = tok.new_zeros(n + 1).index_add(0, ids, inside.reshape(-1).to(tok.dtype))[:n]
        return sums / counts

    class Mixing(M.SeqModel):  # positions mix through a running mean: documents see each other
        def forward(self, tokens):
            x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
            x = x.cumsum(1) / torch.arange(1, tokens.shape[1] + 1)[:, None]
            return self.out(self.rms(x + torch.tanh(self.fc(self.ln(x)))))

    layouts = {
        "two rows": [[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 3, 3]],
        "padding at the end": [[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, -1, -1]],
        "all-padding row": [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, -1], [-1] * 8],
        "one per row": [[0] * 8, [1] * 8],
    }
    out = []
    for name, layout in layouts.items():
        docs = torch.tensor(layout)
        tokens = torch.randint(1, 11, docs.shape, generator=torch.Generator().manual_seed(3)) * (docs >= 0)
        for cls, tag in ((M.SeqModel, "block-diagonal"), (Mixing, "documents see each other")):
            def run(docs=docs, tokens=tokens, cls=cls):
                model = cls()
                several = bool((docs[:, 1:] != docs[:, :-1]).any())  # a row with more than one document
                return outcome(model, doc_losses, (tokens, docs), {"broadcast": ["pos"]}, documents=docs[:, :-1],
                               interacting=cls is Mixing and several)
            out.append((f"packed/{name}/{tag}", run))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results, counts = [], collections.Counter()
    for name, run in hf_configs() + layer_configs() + packed_configs():
        if args.only not in name:
            continue
        kind, detail = run()
        counts[kind] += 1
        results.append({"config": name, "outcome": kind, "detail": detail})
        print(f"{kind:8s} {name}  {detail[:160]}", flush=True)
    print(f"\n{sum(counts.values())} configurations: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    write_results("field_self_influence", {"counts": dict(counts), "results": results})


if __name__ == "__main__":
    main()
