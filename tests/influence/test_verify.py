"""Run-time verification: each silent failure class of the layer rules raises, and the check runs only
on the first call and when the parameters, modules or input layout change."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reweighting.influence import SelfInfluence, per_sample_grads_loop, per_sample_sq_norms
from reweighting.influence.layers import RULES
from reweighting.influence.layers.linear import linear as linear_rule
from reweighting.influence.verify import VerificationError, check_units, unit_weights

from . import models as M


def step(si, model, loss_fn, *inputs, **norms_kw):
    with si.capture():
        losses = loss_fn(model, *inputs)
    return si.norms(losses, **norms_kw)


def test_check_units_spread_over_the_batch_and_weights_select_them():
    assert check_units(5, 2) == [0, 4]
    assert check_units(5, 3) == [0, 2, 4]
    assert check_units(1, 2) == [0]
    assert check_units(3, 9) == [0, 1, 2]
    w = unit_weights([0, 2], 5, [2, 2, 1], "cpu")  # micro-batches: unit 2 is sample 4 alone
    assert w[0].tolist() == [1, 1, 0, 0, 0] and w[1].tolist() == [0, 0, 0, 0, 1]


def test_verifies_on_the_first_call_and_on_each_change_only():
    model = M.mlp()
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    si = SelfInfluence(model)
    for _ in range(3):
        step(si, model, M.regression_loss, x, y)
    assert si.verifications == 1
    step(si, model, M.regression_loss, torch.randn(6, 5), torch.randn(6, 3))  # a new batch size
    assert si.verifications == 2
    step(si, model, M.regression_loss, x, y, microbatches=2)  # units change
    assert si.verifications == 3
    model[0].bias.requires_grad_(False)  # the trainable set changes
    step(si, model, M.regression_loss, x, y)
    assert si.verifications == 4
    model.eval()  # the module modes change
    step(si, model, M.regression_loss, x, y)
    assert si.verifications == 5
    every = SelfInfluence(model, verify_every=2)
    for _ in range(5):
        step(every, model, M.regression_loss, x, y)
    assert every.verifications == 3  # calls 1, 3, 5
    off = SelfInfluence(model, verify=False)
    step(off, model, M.regression_loss, x, y)
    assert off.verifications == 0


def test_a_wrong_rule_is_caught_naming_its_parameter(monkeypatch):
    def off_by_a_bit(module, activation, output_grad):
        out = linear_rule(module, activation, output_grad * 1.01)
        return out

    monkeypatch.setitem(RULES, nn.Linear, off_by_a_bit)
    model = M.mlp()
    si = SelfInfluence(model)
    with pytest.raises(VerificationError, match=r"parameter '0.weight'.*relative error 0.02"):
        step(si, model, M.regression_loss, torch.randn(4, 5), torch.randn(4, 3))
    # Only the update path wrong (norms right): still caught, by the weighted-update comparison.
    monkeypatch.setitem(RULES, nn.Linear, linear_rule)
    si = SelfInfluence(model)

    class BadUpdate:
        def __init__(self, f):
            self.f, self.units, self.shape = f, f.units, f.shape

        def sq_norms(self):
            return self.f.sq_norms()

        def weighted(self, w):
            return self.f.weighted(w) * 1.05

        def ghost_is_cheaper(self):
            return True

    def bad_update(module, activation, output_grad):
        return {k: BadUpdate(f) for k, f in linear_rule(module, activation, output_grad).items()}

    monkeypatch.setitem(RULES, nn.Linear, bad_update)
    with pytest.raises(VerificationError, match="gradient \\(as the weighted update forms it\\)"):
        step(si, model, M.regression_loss, torch.randn(4, 5), torch.randn(4, 3))


class Centred(nn.Module):
    """Samples that interact: each sample's features are centred over the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0)))


def test_interacting_samples_are_caught():
    model = Centred()
    x, y = torch.randn(4, 5), torch.randn(4, 1)
    with pytest.raises(VerificationError, match="samples that interact"):
        step(SelfInfluence(model), model, M.regression_loss, x, y)
    # A contrastive loss: each sample's loss depends on the others' embeddings.
    enc = nn.Linear(5, 3)

    def contrastive(model, x, y):
        z = F.normalize(model(x), dim=1)
        return -torch.log_softmax(z @ z.t() * 5, 1).diagonal()

    with pytest.raises(VerificationError, match="parameter 'weight'"):
        step(SelfInfluence(enc), enc, contrastive, x, y)

    class BatchStats(nn.Module):  # F.batch_norm in training mode, no module to refuse
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(F.batch_norm(self.fc(x), None, None, training=True))

    model = BatchStats()
    with pytest.raises(VerificationError):
        step(SelfInfluence(model), model, M.regression_loss, x, y)


class SeqFirst(nn.Module):
    """A Linear run on [T, B, d]: dim 0 is not the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):  # x: [B, T, 3]
        return self.fc(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_whose_first_dim_is_not_the_batch_is_caught_even_when_the_sizes_match():
    model = SeqFirst()
    y_loss = lambda model, x, y: ((model(x) - y) ** 2).sum((1, 2))  # noqa: E731
    with pytest.raises(ValueError, match="batch in dim 1 \\(a sequence-first layout"):  # T != B: the shapes tell
        step(SelfInfluence(model), model, y_loss, torch.randn(3, 4, 3), torch.randn(3, 4, 2))
    with pytest.raises(VerificationError, match="parameter 'fc.weight'.*first dimension is not the batch"):
        step(SelfInfluence(model), model, y_loss, torch.randn(3, 3, 3), torch.randn(3, 3, 2))  # T == B


def test_a_position_table_without_broadcast_is_caught_when_t_equals_b():
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=6, t=7)  # the model sees T = 6 = B positions
    with pytest.raises(VerificationError, match="'pos.weight'"):
        step(SelfInfluence(model), model, M.seq_loss, tokens, mask)
    got = step(SelfInfluence(model, broadcast=["pos"]), model, M.seq_loss, tokens, mask)
    want = per_sample_sq_norms(model, M.seq_loss, tokens, mask)
    assert ((got - want).abs().max() / want.max()) < 1e-4


def test_sequence_first_transformer_layers_are_refused_by_their_build():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False by default
    with pytest.raises(ValueError, match="batch_first=False.*build it with batch_first=True"):
        SelfInfluence(layer)
    SelfInfluence(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), unsupported="reference")


def test_the_trainable_set_is_read_at_each_call():
    model = M.mlp()
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    si = SelfInfluence(model)
    model[2].requires_grad_(False)  # frozen after the engine was made: no longer counted
    got = step(si, model, M.regression_loss, x, y)
    want = per_sample_sq_norms(model, M.regression_loss, x, y, params=["0.weight", "0.bias"])
    assert torch.allclose(got, want, rtol=1e-5)
    si.weighted_backward(torch.full((4,), 0.25))
    assert model[2].weight.grad is None
    model[2].requires_grad_(True)  # unfrozen again: counted and updated
    model.zero_grad(set_to_none=True)
    got = step(si, model, M.regression_loss, x, y)
    assert torch.allclose(got, per_sample_sq_norms(model, M.regression_loss, x, y), rtol=1e-5)
    si.weighted_backward(torch.full((4,), 0.25))
    ref = per_sample_grads_loop(model, M.regression_loss, x, y)["2.weight"].mean(0)
    assert torch.allclose(model[2].weight.grad, ref, atol=1e-6)


def test_a_float64_model_gets_float64_norms():
    model = M.mlp().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    si = SelfInfluence(model)
    got = step(si, model, M.regression_loss, x, y)
    assert got.dtype == torch.float64
    grads = per_sample_grads_loop(model, M.regression_loss, x, y)
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert want.dtype == torch.float64 and ((got - want).abs().max() / want.max()) < 1e-12
    si.weighted_backward(torch.full((4,), 0.25, dtype=torch.float64))
    ref = grads["0.weight"].mean(0)
    assert (model[0].weight.grad - ref).abs().max() < 1e-12


class Table(nn.Module):
    def __init__(self, batched):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 1)
        self.batched = batched

    def forward(self, tokens):
        b, t = tokens.shape
        pos = torch.arange(t).expand(b, t) if self.batched else torch.arange(t)
        return self.head(torch.tanh(self.emb(tokens) + self.pos(pos))).squeeze(-1)


def table_loss(model, tokens, y):
    return ((model(tokens) - y) ** 2).sum(1)


@pytest.mark.parametrize("batched", [False, True])
def test_a_broadcast_module_called_batched_is_taken_as_an_ordinary_call(batched):
    model = Table(batched)
    tokens, y = torch.randint(0, 9, (3, 5)), torch.randn(3, 5)
    si = SelfInfluence(model, broadcast=["pos"])
    got = step(si, model, table_loss, tokens, y)
    want = per_sample_sq_norms(model, table_loss, tokens, y)
    assert ((got - want).abs().max() / want.max()) < 1e-5


def test_a_broadcast_module_on_an_unexpandable_shape_is_refused():
    class Pairwise(nn.Module):  # a [T, T] table of relative positions, as T5's attention bias
        def __init__(self):
            super().__init__()
            self.emb, self.rel = nn.Linear(3, 2), nn.Embedding(9, 2)

        def forward(self, x):
            t, h = x.shape[1], self.emb(x)
            rel = self.rel((torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs())  # [T, T, 2]
            return torch.einsum("bsc,tsc->bt", h, rel)

    model = Pairwise()
    x, y = torch.randn(3, 4, 3), torch.randn(3, 4)
    loss = lambda model, x, y: ((model(x) - y) ** 2).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="'rel'.*shape \\(4, 4\\).*reference=\\[\\.\\.\\.\\]"):
        step(SelfInfluence(model, broadcast=["rel"]), model, loss, x, y)
    si = SelfInfluence(model, reference=["rel"])  # exact, from autograd
    got = step(si, model, loss, x, y)
    assert ((got - per_sample_sq_norms(model, loss, x, y)).abs().max()) < 1e-4 * got.max()


class Cumulative(nn.Module):
    """Position-wise layers around a running sum over positions: each position sees all before it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(11, 4), nn.Linear(4, 11)

    def forward(self, tokens, documents=None):
        h = self.emb(tokens)
        if documents is None:
            return self.head(torch.tanh(h.cumsum(1) / 4))
        # per document: the running sum restarts at each document (block-diagonal)
        same = (documents[:, :, None] == documents[:, None, :]) & (
            torch.arange(tokens.shape[1])[:, None] >= torch.arange(tokens.shape[1])[None, :])
        return self.head(torch.tanh(torch.einsum("bts,bsd->btd", same.float(), h) / 4))


def test_documents_that_see_each_other_in_a_packed_row_are_caught():
    tokens = torch.randint(1, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    documents = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3]])

    def doc_loss(model, tokens, mixed):
        logits = model(tokens, None if mixed else documents)
        tok = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").reshape(-1)
        return torch.zeros(4).index_add(0, documents.reshape(-1), tok) / 3

    model = Cumulative()
    si = SelfInfluence(model)
    with pytest.raises(VerificationError, match="documents of a packed row see each other"):
        step(si, model, doc_loss, tokens, True, documents=documents)
    got = step(si, model, doc_loss, tokens, False, documents=documents)  # block-diagonal: exact
    losses = doc_loss(model, tokens, False)
    want = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(losses[d], list(model.parameters()),
                                                                          retain_graph=True)) for d in range(4)])
    assert ((got - want).abs().max() / want.max()) < 1e-5


class CentringNorm(nn.Module):
    """Looks like an RMSNorm (a 1-d weight and an eps) but centres first (as Cohere's LayerNorm)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-5

    def forward(self, x):
        x32 = x.float() - x.float().mean(-1, keepdim=True)
        return (self.weight * x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SquaredWeightNorm(CentringNorm):
    """An RMSNorm scaled by weight**2: equal to the rule's formula only while the weight is all ones."""

    def forward(self, x):
        x32 = x.float()
        return (self.weight ** 2 * x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.mark.parametrize("norm", [CentringNorm, SquaredWeightNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_look_alikes_are_refused_whatever_the_dtype_and_weight(norm, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), norm(8), nn.Linear(8, 1)).to(dtype)
    si = SelfInfluence(model)
    x, y = torch.randn(3, 4, dtype=dtype) + 1.0, torch.randn(3, 1, dtype=dtype)
    with pytest.raises(ValueError, match=r"module '1' \(" + norm.__name__ + r"\) holds a 1-d weight and an eps"):
        step(si, model, M.regression_loss, x, y)


def test_a_true_rmsnorm_look_alike_is_accepted_and_exact():
    class Plain(CentringNorm):
        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Plain(8), nn.Linear(8, 1))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x, y = torch.randn(3, 4), torch.randn(3, 1)
    got = step(SelfInfluence(model), model, M.regression_loss, x, y)
    want = per_sample_sq_norms(model, M.regression_loss, x, y)
    assert ((got - want).abs().max() / want.max()) < 1e-5


def test_weighted_backward_refuses_non_finite_weights():
    model = M.mlp()
    si = SelfInfluence(model)
    step(si, model, M.regression_loss, torch.randn(4, 5), torch.randn(4, 3))
    with pytest.raises(ValueError, match="weights has NaN values at sample indices \\[2\\]"):
        si.weighted_backward(torch.tensor([0.2, 0.3, float("nan"), 0.5]))
    assert all(p.grad is None for p in model.parameters())


def test_refusals_name_the_layout_they_saw():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            b, t, d = x.shape
            return self.fc(x.reshape(b * t, d)).reshape(b, t, 2)

    model = Flat()
    loss = lambda model, x, y: ((model(x) - y) ** 2).sum((1, 2))  # noqa: E731
    with pytest.raises(ValueError, match="looks flattened \\(12 rows = 3 samples x 4\\)"):
        step(SelfInfluence(model), model, loss, torch.randn(3, 4, 3), torch.randn(3, 4, 2))
    # A head run outside capture(): its use is named, and the fix says to run it inside.
    mlp = M.mlp()
    si = SelfInfluence(mlp, functional=False)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    with si.capture():
        h = mlp[1](mlp[0](x))
    losses = ((mlp[2](h) - y) ** 2).sum(1)
    with pytest.raises(RuntimeError, match="'2.bias' is used.*called outside `with si.capture\\(\\):`, run it"):
        si.norms(losses)
