"""Tiny models and per-sample losses shared by the self-influence tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Scale(nn.Module):
    """A layer with a parameter and no per-sample rule (the parameter enters through ``exp``)."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain.exp()


def mlp(with_scale=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)]
    if with_scale:
        layers.insert(2, Scale(7))
    return nn.Sequential(*layers)


def regression_loss(model, x, y):
    return ((model(x) - y) ** 2).sum(1)


class SeqModel(nn.Module):
    """Embedding (with padding) -> LayerNorm -> Linear on [B, T, d] -> RMSNorm -> tied output layer."""

    def __init__(self, vocab=11, d=6, tie=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(8, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.rms = nn.RMSNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
        x = x + torch.tanh(self.fc(self.ln(x)))
        return self.out(self.rms(x))


def seq_loss(model, tokens, mask):
    """Mean next-token loss over real (mask = 1) positions of each sequence."""
    logits = model(tokens[:, :-1])
    token_loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (token_loss * m).sum(1) / m.sum(1)


def seq_batch(b=4, t=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (b, t), generator=g)
    lengths = torch.tensor([t, t - 2, t - 3, t][:b] + [t] * max(0, b - 4))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    tokens = tokens * mask  # padding token 0 after each sequence's end
    return tokens, mask


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(1, 4, 3, padding="same", dilation=2)
        self.c3 = nn.Conv2d(4, 4, 2, stride=2, groups=4, bias=False)
        self.head = nn.Linear(6 * 5 + 4 * 3 * 3, 2)

    def forward(self, seq, img):
        a = torch.tanh(self.c1(seq)).flatten(1)
        b = self.c3(torch.tanh(self.c2(img))).flatten(1)
        return self.head(torch.cat([a, b], 1))


def conv_loss(model, seq, img, y):
    return F.cross_entropy(model(seq, img), y, reduction="none")


def conv_batch(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 10, generator=g), torch.randn(b, 1, 6, 6, generator=g), torch.tensor([0, 1, 1][:b])


def regression_loss_3d(model, x, y):
    return ((model(x) - y) ** 2).sum((1, 2))
