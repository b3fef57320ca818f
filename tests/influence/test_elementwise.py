"""Elementwise parameters (LayerScale, free biases, learned scales): recognised by what the forward
computes, exact against torch.func per-sample gradients, and refused when the formula does not hold."""

import copy

import pytest
import torch
import torch.nn as nn

from reweighting.influence import SelfInfluence, per_sample_grads, per_sample_sq_norms
from reweighting.influence.layers import call_rule_for, elementwise_form

from .test_engine import assert_rel_close, weighted_reference


class LayerScale(nn.Module):
    def __init__(self, d, init=1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(d) + 0.01 * torch.arange(d))

    def forward(self, x):
        return self.gamma * x


class FreeBias(nn.Module):  # a learned position table added to [B, T, d]
    def __init__(self, t, d):
        super().__init__()
        self.table = nn.Parameter(0.1 * torch.randn(1, t, d))

    def forward(self, x):
        return x + self.table


class ScalarScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.s


class Affine(nn.Module):  # ResMLP's Aff, on channels of [B, C, H, W]; the shift named first
    def __init__(self, c):
        super().__init__()
        self.beta = nn.Parameter(0.1 * torch.randn(c, 1, 1))
        self.alpha = nn.Parameter(1 + 0.1 * torch.randn(c, 1, 1))

    def forward(self, x):
        return self.beta + self.alpha * x


class Block(nn.Module):
    def __init__(self, t=5, d=6):
        super().__init__()
        self.pos = FreeBias(t, d)
        self.fc = nn.Linear(d, d)
        self.ls = LayerScale(d)
        self.scale = ScalarScale()
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.pos(x)
        h = h + self.ls(torch.tanh(self.fc(h)))
        return self.head(self.scale(h)).mean(1)


def block_loss(model, x, y):
    return ((model(x) - y) ** 2).sum(1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.aff = Affine(3)
        self.head = nn.Linear(3 * 16, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.aff(self.conv(x))).flatten(1))


def conv_loss(model, x, y):
    return ((model(x) - y) ** 2).sum(1)


def check_norms_and_update(model, loss_fn, inputs, microbatches=None):
    # The reference runs on a copy: torch.func.functional_call leaves plain tensors in place of the
    # parameters of a module that appears twice in the model.
    reference = copy.deepcopy(model)
    si = SelfInfluence(model)  # no unsupported= argument: every parameter has a rule
    assert si.second_backward_parameters == []
    with si.capture():
        losses = loss_fn(model, *inputs)
    got = si.norms(losses, microbatches=microbatches)
    if microbatches is None:
        assert_rel_close(got, per_sample_sq_norms(reference, loss_fn, *inputs))
    else:
        grads = per_sample_grads(reference, loss_fn, *inputs)
        sizes = [len(c) for c in torch.arange(inputs[0].shape[0]).tensor_split(microbatches)]
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
        want = torch.stack([c.sum(0) for c in flat.split(sizes)]).square().sum(1)
        assert_rel_close(got, want)
        return
    w = torch.softmax(torch.randn(inputs[0].shape[0]), 0)
    si.weighted_backward(w)
    want = weighted_reference(reference, loss_fn, w, *inputs)
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, want[name])


@pytest.mark.parametrize("microbatches", [None, 2])
def test_layerscale_free_bias_and_scalar_scale_match_the_reference(microbatches):
    torch.manual_seed(0)
    model = Block()
    check_norms_and_update(model, block_loss, (torch.randn(4, 5, 6), torch.randn(4, 2)), microbatches)


def test_per_channel_affine_on_images_matches_the_reference():
    torch.manual_seed(1)
    model = ConvNet()
    check_norms_and_update(model, conv_loss, (torch.randn(3, 2, 4, 4), torch.randn(3, 1)))


def test_a_parameter_used_twice_in_the_forward_sums_both_uses():
    torch.manual_seed(2)
    ls = LayerScale(4)
    model = nn.Sequential(nn.Linear(3, 4), ls, nn.Tanh(), ls, nn.Linear(4, 1))
    check_norms_and_update(model, block_loss, (torch.randn(5, 3), torch.randn(5, 1)))


def test_forms_are_classified_with_random_values_not_the_current_ones():
    assert elementwise_form(LayerScale(3)) == ("gamma", None)
    assert elementwise_form(FreeBias(2, 3)) == (None, "table")
    assert elementwise_form(ScalarScale()) == ("s", None)
    assert elementwise_form(Affine(3)) == ("alpha", "beta")

    class ShiftThenScale(nn.Module):  # (x + b) * s equals x * s + b while s = 1 and b = 0, not after
        def __init__(self):
            super().__init__()
            self.s, self.b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (x + self.b) * self.s

    class Squared(nn.Module):  # x * s^2 equals x * s while s = 1
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s ** 2

    class InPlace(LayerScale):  # modifies its input: the stored input would be the output
        def forward(self, x):
            return x.mul_(self.gamma)

    class Frozen(LayerScale):
        def __init__(self):
            super().__init__(3)
            self.gamma.requires_grad_(False)

    for module in (ShiftThenScale(), Squared(), InPlace(3), Frozen(), nn.Tanh()):
        assert elementwise_form(module) is None, type(module).__name__
        assert call_rule_for(module) is None
    assert elementwise_form(nn.Linear(3, 3)) is None  # registered types keep their own rule
    assert call_rule_for(nn.Linear(3, 3)) is None


def test_unrecognised_forms_raise_naming_the_module_or_use_the_reference():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return torch.tanh(x) * self.g

    model = nn.Sequential(nn.Linear(3, 4), Gate(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"'1' \(Gate\)"):
        SelfInfluence(model)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    si = SelfInfluence(model, unsupported="reference")
    with si.capture():
        losses = block_loss(model, x, y)
    assert_rel_close(si.norms(losses), per_sample_sq_norms(model, block_loss, x, y))


def test_a_forward_that_changes_with_the_input_shape_raises_on_use():
    class Sneaky(LayerScale):
        def forward(self, x):
            return self.gamma * x if x.dim() == 2 else self.gamma * x * x

    model = nn.Sequential(nn.Linear(3, 4), Sneaky(4), nn.Linear(4, 1))
    si = SelfInfluence(model)  # the probe on [3, 4] saw x * gamma
    with si.capture():
        losses = model(torch.randn(2, 5, 3)).sum((1, 2))
    with pytest.raises(ValueError, match=r"Sneaky looked like y = x \* scale \+ shift.*shape \(2, 5, 4\)"):
        si.norms(losses)


def test_a_parameter_spanning_the_batch_is_refused():
    class PerRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(4, 3))

        def forward(self, x):
            return x + self.b

    model = nn.Sequential(PerRow(), nn.Linear(3, 1))
    si = SelfInfluence(model)
    with si.capture():
        losses = model(torch.randn(4, 3)).sum(1)
    with pytest.raises(ValueError, match=r"PerRow.b has shape \(4, 3\), which reaches the batch"):
        si.norms(losses)


def test_classifying_leaves_the_global_generator_alone():
    module = Affine(5)
    state = torch.get_rng_state()
    assert elementwise_form(module) is not None
    assert torch.equal(state, torch.get_rng_state())
