"""The analytic case: p_bias = N(0, I), p_data = N(m, I), whose noised marginals and ratio are known exactly.

Under ``x_t = alpha x_0 + sigma eps`` both marginals are Gaussian with variance ``v = alpha^2 + sigma^2``:
``p_bias^t = N(0, v I)``, ``p_data^t = N(alpha m, v I)``, so ``log w_t(x) = (alpha m.x - alpha^2 |m|^2 / 2) / v``
and ``grad log w_t = alpha m / v`` (constant in ``x``).
"""

import torch
import torch.nn as nn


class ExactGaussianLogit(nn.Module):
    """The exact log-ratio of N(m, I) to N(0, I) after noising, as a discriminator logit."""

    def __init__(self, m: torch.Tensor, schedule) -> None:
        super().__init__()
        self.m = nn.Parameter(m.clone().float())  # a parameter, so tests can check it gets no gradient
        self.schedule = schedule

    def forward(self, x, t):
        a, s = self.schedule.alpha_sigma(t)
        v = a * a + s * s
        return (a * (x.reshape(x.shape[0], -1) @ self.m) - 0.5 * a * a * (self.m @ self.m)) / v


def data_score(x, t, m, schedule):
    """grad log p_data^t(x) = -(x - alpha m) / v."""
    a, s = schedule.alpha_sigma(t)
    v = (a * a + s * s)[:, None]
    return -(x - a[:, None] * m) / v


def target_from_score(prediction, x, t, score, schedule):
    """The parameterisation's value that corresponds to a score at (x, t) (Tweedie)."""
    a, s = schedule.alpha_sigma(t)
    a, s = a[:, None], s[:, None]
    eps = -s * score
    x0 = (x + s * s * score) / a
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": score}[prediction]


class GaussianEps(nn.Module):
    """The exact eps-prediction for data N(mu, std^2 I): eps_hat = sigma (x - alpha mu) / (alpha^2 std^2 + sigma^2)."""

    def __init__(self, mu, std, schedule, prediction="eps"):
        super().__init__()
        self.mu, self.std, self.schedule, self.prediction = mu, std, schedule, prediction

    def forward(self, x, t):
        a, s = self.schedule.alpha_sigma(t)
        a, s = a[:, None], s[:, None]
        score = -(x - a * self.mu) / (a * a * self.std**2 + s * s)
        return target_from_score(self.prediction, x, t, score, self.schedule)
