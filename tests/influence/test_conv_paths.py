"""Convolutions on both of their paths (ghost factor or grouped per-sample gradients, chosen from the
shapes), with groups, strides, dilation and padding modes, against torch.func per-sample gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reweighting.influence import SelfInfluence
from reweighting.influence.factors import OuterFactor, SumFactor
from reweighting.influence.layers.conv import conv

from .test_elementwise import check_norms_and_update


class Net(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module, features: int):
        super().__init__()
        self.first, self.second, self.head = first, second, nn.Linear(features, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))).flatten(1))


def loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def cases():
    torch.manual_seed(0)
    return {
        # 6x6 images: many positions, few channels -> per-sample gradients; then 1 position, many channels -> ghost
        "2d": (Net(nn.Conv2d(2, 8, 3, padding=1, padding_mode="circular"), nn.Conv2d(8, 8, 6, groups=2), 8),
               torch.randn(5, 2, 6, 6)),
        "1d": (Net(nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=2, groups=3),
                   nn.Conv1d(6, 12, 4, bias=False), 12 * 1), torch.randn(5, 3, 8)),
    }


@pytest.mark.parametrize("name", ["2d", "1d"])
def test_both_paths_match_the_reference(name):
    model, x = cases()[name]
    y = torch.randint(0, 2, (x.shape[0],))
    check_norms_and_update(model, loss, (x, y))


def test_the_path_follows_the_shapes():
    model, x = cases()["2d"]
    h = model.first(x)
    many_positions = conv(model.first, x, torch.randn_like(h))["weight"]
    one_position = conv(model.second, h, torch.randn_like(model.second(h)))["weight"]
    assert isinstance(many_positions, SumFactor) and isinstance(one_position, OuterFactor)


def test_same_padding_with_reflection_on_the_grouped_path():
    torch.manual_seed(1)
    model = Net(nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect", dilation=2), nn.Identity(), 4 * 7 * 7)
    x, y = torch.randn(4, 2, 7, 7), torch.randint(0, 2, (4,))
    si = SelfInfluence(model)
    assert si.second_backward_parameters == []
    check_norms_and_update(model, loss, (x, y))
