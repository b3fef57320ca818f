import itertools
import math

import pytest
import torch

from reweighting.qprobe import (
    QProbe,
    bce_loss,
    chunk_groups,
    evaluate_probe,
    expected_return,
    fit_probe,
    mean_reward,
    mse_loss,
    pass_at_k,
    pg_loss,
    preference_loss,
    select,
    selection_weights,
)

LN3 = math.log(3.0)


def test_mse_hand_computed():
    assert float(mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)


def test_bce_hand_computed():
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4: -log(1/2) for r = 1, -log(1 - 3/4) for r = 0.
    got = bce_loss(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


def test_bce_rejects_rewards_outside_unit_interval():
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        bce_loss(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))


def test_pg_hand_computed_with_mask_and_temperature():
    # softmax([0, ln 3]) = [1/4, 3/4]: expected reward 1/4 (group 1) and 3/4 (group 2).
    q = torch.tensor([[0.0, LN3, 7.0], [0.0, LN3, -1.0]])
    r = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert float(pg_loss(q, r, mask)) == pytest.approx(-(0.25 + 0.75) / 2, rel=1e-6)
    # Doubling Q at temperature 2 gives the same softmax.
    assert float(pg_loss(2 * q, r, mask, temperature=2.0)) == pytest.approx(-0.5, rel=1e-6)


def test_pg_constant_baseline_leaves_gradient_unchanged():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    r = torch.rand(4, 6)
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    grads, losses = [], []
    for b in (0.0, 0.7, -3.0):
        q = base.clone().requires_grad_(True)
        loss = pg_loss(q, r, mask, temperature=0.5, baseline=b)
        loss.backward()
        grads.append(q.grad)
        losses.append(float(loss.detach()))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)
    assert losses[1] == pytest.approx(losses[0] + 0.7, abs=1e-5)  # the loss itself shifts by b
    assert grads[0].abs().sum() > 0 and bool((grads[0][~mask] == 0).all())


def test_pg_errors():
    with pytest.raises(ValueError, match=r"group indices \[1\]"):
        pg_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="temperature"):
        pg_loss(torch.zeros(2, 2), torch.zeros(2, 2), temperature=0.0)
    with pytest.raises(ValueError, match=r"rewards has NaN values at sample indices \[3\]"):
        pg_loss(torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [0.0, math.nan]]))


def test_preference_hand_computed():
    got = preference_loss(torch.tensor([0.0, LN3]), torch.tensor([0.0, 0.0]))
    assert float(got) == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)


def test_chunk_groups_partitions_each_group():
    groups = torch.tensor([3, 1, 3, 3, 1, 7, 3, 3])
    table = chunk_groups(groups, 2, torch.Generator().manual_seed(0))
    idx = table[table >= 0]
    assert sorted(idx.tolist()) == list(range(8))
    for row in table:
        members = row[row >= 0]
        assert len(set(groups[members].tolist())) == 1
    assert table.shape == (3 + 1 + 1, 2)  # group 3: 5 samples -> 3 chunks; 1: 2 -> 1; 7: 1 -> 1


def _brute_expected(q, r, k, beta):
    per_prompt = []
    for qi, ri in zip(q.tolist(), r.tolist()):
        chunks = []
        for c in range(len(qi) // k):
            qq, rr = qi[c * k:(c + 1) * k], ri[c * k:(c + 1) * k]
            if beta == 0:
                top = max(qq)
                winners = [x for x, y in zip(rr, qq) if y == top]
                chunks.append(sum(winners) / len(winners))
            else:
                e = [math.exp(y / beta) for y in qq]
                chunks.append(sum(a * x for a, x in zip(e, rr)) / sum(e))
        per_prompt.append(sum(chunks) / len(chunks))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_expected_return_equals_brute_force(k, beta):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 4, (5, 7), generator=g).float() / 3  # ties, to exercise argmax sharing
    r = torch.rand(5, 7, generator=g)
    assert float(expected_return(q, r, k, beta)) == pytest.approx(_brute_expected(q, r, k, beta), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_pass_at_k_equals_enumeration(k):
    r = torch.tensor([[1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1.0]])
    brute = []
    for row in r.tolist():
        subsets = list(itertools.combinations(row, k))
        brute.append(sum(max(s) >= 1 for s in subsets) / len(subsets))
    assert float(pass_at_k(r, k)) == pytest.approx(sum(brute) / len(brute), rel=1e-6)
    assert float(pass_at_k(r, 1)) == pytest.approx(float(mean_reward(r)))


def test_evaluate_probe_table():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    table = evaluate_probe(torch.tensor([[2.0, 0.0, 0.0, 0.0]]), r, ks=[1, 4], betas=[0.0])
    assert table["baseline"] == 0.25 and table["pass_at_k"][4] == 1.0
    assert table["expected_return"][0.0] == {1: 0.25, 4: 1.0}


def test_select_argmax_and_weights():
    q = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    choice, w = select(q, 0.0)
    assert choice.tolist() == [1, 0]
    assert w.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    _, w = select(q, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.softmax(q / 0.5, dim=1))
    assert w.dtype == torch.float32 and not w.requires_grad


def test_select_errors_name_the_problem():
    with pytest.raises(ValueError, match="beta"):
        select(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match=r"q has NaN values at sample indices \[2\]"):
        select(torch.tensor([0.0, 1.0, math.nan]), 1.0)
    with pytest.raises(ValueError, match="no candidates"):
        selection_weights(torch.zeros(2, 0), 1.0)


def test_selection_approaches_tilted_distribution_as_k_grows():
    # Candidates are of three kinds drawn from p0; Q depends on the kind. Best-of-k sampling from
    # softmax(Q / beta) should tend to p0 exp(Q / beta) / Z.
    p0 = torch.tensor([0.6, 0.3, 0.1])
    q_kind = torch.tensor([0.0, 0.5, 1.0])
    beta = 0.5
    target = p0 * torch.exp(q_kind / beta)
    target = target / target.sum()
    g = torch.Generator().manual_seed(0)
    trials = 40_000
    distances = {}
    for k in (1, 4, 64):
        kinds = torch.multinomial(p0.expand(trials, 3), k, replacement=True, generator=g)
        choice, _ = select(q_kind[kinds], beta, g)
        picked = kinds.gather(1, choice.unsqueeze(1)).squeeze(1)
        empirical = torch.bincount(picked, minlength=3).float() / trials
        distances[k] = float((empirical - target).abs().sum() / 2)
    assert distances[1] > distances[4] > distances[64]
    assert distances[64] < 0.02


def test_probe_save_load_roundtrip(tmp_path):
    for hidden in ((), (8, 4)):
        torch.manual_seed(0)
        probe = QProbe(5, hidden)
        probe.set_standardization(torch.randn(5), torch.rand(5) + 0.5)
        path = tmp_path / f"probe{len(hidden)}.safetensors"
        probe.save(path)
        loaded = QProbe.load(path)
        x = torch.randn(3, 5)
        torch.testing.assert_close(loaded.score(x), probe.score(x))
        assert loaded.hidden == tuple(hidden)
    with pytest.raises(ValueError, match="last dimension 5"):
        probe(torch.zeros(2, 4))


def test_fit_probe_learns_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 6, generator=g) * 10 + 3  # an unstandardised embedding
    r = (x[:, 0] > 3).float()
    groups = torch.arange(600) // 12
    for objective in ("mse", "bce", "pg", "preference"):
        a = fit_probe(x, r, groups, objective, epochs=15, lr=5e-2, batch_size=100, progress=False, seed=3)
        b = fit_probe(x, r, groups, objective, epochs=15, lr=5e-2, batch_size=100, progress=False, seed=3)
        qa = a.score(x)
        torch.testing.assert_close(qa, b.score(x))
        er = expected_return(qa.reshape(50, 12), r.reshape(50, 12), 12, 0.0)
        assert float(er) > 0.95, objective


def test_fit_probe_errors():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="needs groups"):
        fit_probe(x, torch.zeros(4), None, "pg", progress=False)
    with pytest.raises(ValueError, match=r"indices \[2\]"):
        fit_probe(x, torch.tensor([0.0, 1.0, 3.0, 0.0]), None, "bce", progress=False)
    bad = x.clone()
    bad[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"features has NaN or infinite values at sample indices \[1\]"):
        fit_probe(bad, torch.zeros(4), None, "mse", progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_probe(x, torch.zeros(4), None, "hinge", progress=False)


def test_fit_probe_applies_the_weight_decay_given():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 4, generator=g)
    r = x[:, 0] * 2
    norms = {}
    for wd in (0.0, 5.0):
        probe = fit_probe(x, r, None, "mse", epochs=20, lr=5e-2, batch_size=50, weight_decay=wd, progress=False)
        norms[wd] = float(probe.net[0].weight.detach().norm())
    assert norms[5.0] < 0.5 * norms[0.0]


def test_selection_respects_mask():
    q = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    w = selection_weights(q, 1.0, mask)
    assert bool((w[~mask] == 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))
    choice, _ = select(q, 0.0, mask=mask)
    assert choice.tolist() == [1, 0]


@pytest.mark.parametrize("objective", ["mse", "bce", "pg", "preference"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_closed_form_linear_fit_equals_autograd_and_adamw(objective, weight_decay):
    # The linear probe's closed-form gradients and written-out AdamW against autograd and
    # torch.optim.AdamW on the same batches: the same weights up to float rounding.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=g) * 2 + 1
    r = (x[:, 0] + torch.randn(300, generator=g) > 1).float()
    groups = torch.arange(300) // 6  # 6 samples per prompt in chunks of 4: padded chunks too
    kwargs = dict(epochs=8, lr=3e-2, batch_size=40, group_size=4, weight_decay=weight_decay, temperature=0.7,
                  progress=False, seed=5)
    fast = fit_probe(x, r, groups, objective, **kwargs)
    slow = fit_probe(x, r, groups, objective, engine="autograd", **kwargs)
    w_fast, w_slow = fast.net[0].weight.detach(), slow.net[0].weight.detach()
    assert float((w_fast - w_slow).abs().max()) <= 1e-5 * float(w_slow.abs().max())
    assert float((w_slow - QProbe(5).net[0].weight.detach()).abs().max()) > 1e-2  # it did train
    if objective in ("mse", "bce"):
        torch.testing.assert_close(fast.net[0].bias, slow.net[0].bias, rtol=1e-5, atol=1e-6)
    else:
        # each prompt's softmax ignores a shift, so dL/db = 0 exactly: b keeps its decayed initial value
        torch.manual_seed(5)
        b0 = QProbe(5).net[0].bias.detach()
        steps = 8 * 10  # 50 prompts -> 100 chunks of <= 4 -> 10 batches of 10 chunks per epoch
        torch.testing.assert_close(fast.net[0].bias.detach(), b0 * (1 - 3e-2 * weight_decay) ** steps)


@pytest.mark.parametrize("objective", ["mse", "bce", "pg", "preference"])
def test_closed_form_loss_gradients_equal_autograd(objective):
    # AdamW ignores a constant factor in the gradient, so the fits above cannot see one: compare
    # dL/dq itself with autograd through the public objectives.
    from reweighting.qprobe.fit import _loss_grad, _preference_pairs

    g = torch.Generator().manual_seed(6)
    valid = torch.ones(5, 4, dtype=torch.bool)
    valid[1, 3] = valid[4, 2:] = False
    q = torch.randn(20, generator=g, requires_grad=True)
    r = torch.randint(0, 3, (20,), generator=g).float() / 2
    if objective == "mse":
        loss = mse_loss(q, r)
    elif objective == "bce":
        loss = bce_loss(q, r)
    elif objective == "pg":
        loss = pg_loss(q.view(5, 4), r.view(5, 4), valid, temperature=0.6)
    else:
        win, lose = _preference_pairs(r.view(5, 4), valid)
        loss = preference_loss(q[win], q[lose])
    (expected,) = torch.autograd.grad(loss, q)
    got = _loss_grad(objective, q.detach(), r, None if objective in ("mse", "bce") else valid, 0.6)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_a_constant_probe_scores_alike_and_its_choice_is_pass_at_1(hidden):
    from reweighting.qprobe import QProbe, evaluate_probe

    probe = QProbe.constant(5, hidden)
    features = torch.randn(3, 4, 5)
    q = probe.score(features)
    assert q.shape == (3, 4) and bool((q == 0).all())
    rewards = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]])
    table = evaluate_probe(q, rewards, [4], [0.0, 0.1])
    for beta in (0.0, 0.1):
        assert table["expected_return"][beta][4] == pytest.approx(float(rewards.mean()))
