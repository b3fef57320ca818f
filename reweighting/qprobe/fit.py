"""Fitting a Q-probe to features and rewards with one of the objectives of docs/methods/qprobe.md#training-objectives.

Defaults are the paper's: AdamW, learning rate 5e-5, 150 epochs, batches of 1000 samples, the
weight decay given here used as given (the authors' public code dropped it, so AdamW silently
applied its own default 0.01), and for ``L_PG`` groups of 10 samples of the same prompt at
temperature 1.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch

from ..checks import check_finite, check_temperature, checks, describe_indices
from .objectives import OBJECTIVES, bce_loss, mse_loss, pg_loss, preference_loss
from .probe import QProbe

__all__ = ["fit_probe", "chunk_groups"]


def chunk_groups(groups: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Split the samples of each group into disjoint chunks of at most ``size``, in random order.

    ``groups[i]`` is the group (prompt) of sample ``i``. Returns ``[C, size]`` sample indices, one
    chunk per row, padded with -1 where a group's last chunk is short. Rows come in random order and
    samples are shuffled within their group, drawn from ``generator``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size (group_size) must be an integer >= 1, got {size!r}")
    _check_groups(groups, "groups")
    n = groups.shape[0]
    order = torch.randperm(n, generator=generator)
    # A stable sort by group keeps the random order inside each group.
    order = order[torch.sort(groups[order], stable=True).indices]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n) - torch.repeat_interleave(starts, counts)
    chunks_per_group = (counts + size - 1) // size
    first_chunk = torch.cumsum(chunks_per_group, 0) - chunks_per_group
    chunk = torch.repeat_interleave(first_chunk, counts) + position // size
    table = torch.full((int(chunks_per_group.sum()), size), -1, dtype=torch.long)
    table[chunk, position % size] = order
    return table[torch.randperm(table.shape[0], generator=generator)]


def _check_groups(groups: torch.Tensor, name: str, n: int | None = None) -> None:
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of prompt ids, got {type(groups).__name__}")
    if groups.dim() != 1 or (n is not None and groups.shape[0] != n):
        expected = f"({n},) to match features" if n is not None else "1-d (one prompt id per sample)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer prompt ids, got dtype {groups.dtype}")


def _check_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: CUDA is not available on this machine or has no such device "
                         f"({torch.cuda.device_count()} CUDA devices)")
    return parsed


def _preference_pairs(r: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within each row, every (preferred, rejected) pair of real samples with a strictly higher reward."""
    better = (r.unsqueeze(2) > r.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    g, i, j = torch.nonzero(better, as_tuple=True)
    return g * r.shape[1] + i, g * r.shape[1] + j


def _check_group_signal(objective: str, groups: torch.Tensor, rewards: torch.Tensor, group_size: int) -> None:
    """The group objectives learn only from groups of two or more samples (a softmax over one sample
    has zero gradient) and from a group with two different rewards (with equal rewards ``pg``'s
    ``sum_i softmax(Q)_i (r_i - b)`` is constant and ``preference`` has no pair): refuse training data
    that cannot move the probe instead of returning the initial one, or one that AdamW drifted on
    rounding noise (it scales a gradient of 1e-9 to steps of ``lr``)."""
    if group_size < 2:
        raise ValueError(f"objective {objective!r} needs group_size >= 2 (groups of one sample have zero "
                         f"gradient), got {group_size}")
    _, inverse, counts = torch.unique(groups.cpu(), return_inverse=True, return_counts=True)
    if not bool((counts > 1).any()):
        raise ValueError(f"objective {objective!r}: every prompt in groups has only one sample, so the loss has "
                         "zero gradient; give several samples per prompt")
    r = rewards.detach().cpu().float()
    hi = torch.full((counts.shape[0],), -math.inf).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((counts.shape[0],), math.inf).scatter_reduce(0, inverse, r, "amin")
    if not bool((hi > lo).any()):
        raise ValueError(f"objective {objective!r} needs a prompt with two samples of different rewards; "
                         "within every group of the given groups the rewards are all equal, so the loss has zero "
                         "gradient")


def _batches(x, r, group_ids, objective, batch_size, group_size, generator):
    """A function that draws one epoch's order and yields its batches ``(x_b, r_b, valid)``.

    Each batch's rows are gathered into one reused buffer (about 2 MB at the paper's sizes, so it
    stays in cache for the step's forward and backward reads): one pass over the data per epoch.
    For the group objectives a batch is ``batch_size // group_size`` chunks (rows of
    :func:`chunk_groups`), ``valid`` masking the padding.
    """
    n, dim = x.shape
    device = x.device
    chunks_per_batch = max(1, batch_size // group_size)
    per_batch = chunks_per_batch * group_size if group_ids is not None else batch_size
    buffer = torch.empty((per_batch if group_ids is not None else min(batch_size, n), dim), device=device)

    def epoch():
        if group_ids is not None:
            table = chunk_groups(group_ids, group_size, generator).to(device)
            order = table.clamp(min=0).reshape(-1)
            valids = (table >= 0).split(chunks_per_batch)
        else:
            order = torch.randperm(n, generator=generator).to(device)
            valids = itertools.repeat(None)
        shuffled_r = r[order]
        for idx, rb, valid in zip(order.split(per_batch), shuffled_r.split(per_batch), valids):
            xb = buffer[: idx.shape[0]]
            torch.index_select(x, 0, idx, out=xb)
            yield xb, rb, valid

    return epoch


def _run_autograd(probe, batches, bar, objective, *, lr, weight_decay, temperature, progress):
    """The general loop: the objective's loss through autograd, ``torch.optim.AdamW``."""
    head = probe.net  # x is standardised already, so the probe's own (identity) standardisation is skipped
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in bar:
        total, steps = 0.0, 0
        for xb, rb, valid in batches():
            if valid is not None:
                q = head(xb).reshape(valid.shape)
                rb = rb.reshape(valid.shape)
                if objective == "pg":
                    loss = pg_loss(q, rb, valid, temperature=temperature)
                else:
                    win, lose = _preference_pairs(rb, valid)
                    if win.numel() == 0:
                        continue
                    flat = q.reshape(-1)
                    loss = preference_loss(flat[win], flat[lose])
            else:
                q = head(xb).squeeze(-1)
                loss = mse_loss(q, rb) if objective == "mse" else bce_loss(q, rb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress:
                total += float(loss)
            steps += 1
        if progress:
            bar.set_postfix(loss=total / max(1, steps))


@torch.no_grad()
def _run_linear(probe, batches, bar, objective, *, lr, weight_decay, temperature, progress):
    """The linear probe ``q = x . w + b`` with each objective's gradient in closed form:

    - ``L_Q``: ``dL/dq_i = 2 (q_i - r_i) / B``;  ``L_CE``: ``(sigmoid(q_i) - r_i) / B``;
    - ``L_PG`` (rows ``g`` of ``C`` chunks, softmax ``p`` over the real samples at temperature ``T``,
      ``a = r`` masked): ``dL/dq_gi = -p_gi (a_gi - sum_j p_gj a_gj) / (C T)``;
    - ``L_QP`` over ``P`` pairs with margin ``d = q_w - q_l``: ``dL/dd = -sigmoid(-d) / P``, added to
      ``q_w`` and subtracted from ``q_l``;

    then ``dL/dw = x^T dL/dq`` and ``dL/db = sum dL/dq`` (exactly 0 for the group objectives, which
    only compare samples of one prompt), and AdamW's update (decoupled weight decay,
    bias-corrected moments, ``torch.optim.AdamW``'s defaults and order of operations) on ``[w, b]``
    as one flat vector.
    """
    linear = probe.net[0]
    dim = linear.in_features
    theta = torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach().reshape(-1)]).float()
    w, b = theta[:dim], theta[dim:]
    grad = torch.zeros_like(theta)
    grad_w, grad_b = grad[:dim], grad[dim:]
    exp_avg, exp_avg_sq = torch.zeros_like(theta), torch.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    decay = 1 - lr * weight_decay
    step = 0
    for _ in bar:
        total, steps = 0.0, 0
        for xb, rb, valid in batches():
            q = torch.addmv(b, xb, w)
            g = _loss_grad(objective, q, rb, valid, temperature)
            if g is None:  # a preference batch without a pair of different rewards
                continue
            torch.mv(xb.T, g, out=grad_w)
            if valid is None:
                torch.sum(g, dim=0, keepdim=True, out=grad_b)
            # else: each group's softmax ignores a common shift, so dL/db is exactly 0 (autograd
            # returns rounding noise there, which AdamW's normalisation turns into a random walk of b).
            step += 1
            # torch.optim.AdamW (single-tensor path), written out.
            if decay != 1.0:
                theta.mul_(decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            theta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            if progress:
                total += _linear_loss(objective, q, rb, valid, temperature)
            steps += 1
        if progress:
            bar.set_postfix(loss=total / max(1, steps))
    linear.weight.copy_(w.view_as(linear.weight))
    linear.bias.copy_(b)


def _loss_grad(objective: str, q: torch.Tensor, rb: torch.Tensor, valid: torch.Tensor | None,
               temperature: float) -> torch.Tensor | None:
    """``dL/dq`` of the objective on one batch in closed form (see :func:`_run_linear`); ``q`` and
    ``rb`` are flat ``[B]``, ``valid`` the ``[C, group_size]`` chunk mask of the group objectives.
    ``None`` for a preference batch with no pair."""
    if objective == "mse":
        return (q - rb).mul_(2.0 / q.shape[0])
    if objective == "bce":
        return torch.sigmoid(q).sub_(rb).div_(q.shape[0])
    if objective == "pg":
        logits = torch.where(valid, q.view(valid.shape) / temperature, -math.inf)
        p = torch.softmax(logits, dim=1)
        a = torch.where(valid, rb.view(valid.shape), 0.0)
        expected = (p * a).sum(dim=1, keepdim=True)
        return (a - expected).mul_(p).mul_(-1.0 / (valid.shape[0] * temperature)).view(-1)
    win, lose = _preference_pairs(rb.view(valid.shape), valid)
    if win.numel() == 0:
        return None
    dg = torch.sigmoid(q[lose] - q[win]).div_(-win.numel())
    return torch.zeros_like(q).index_add_(0, win, dg).index_add_(0, lose, dg.neg())


def _linear_loss(objective, q, rb, valid, temperature) -> float:
    """The objective's value on a batch (for the progress bar only)."""
    if objective == "mse":
        return float(mse_loss(q, rb))
    if objective == "bce":
        return float(bce_loss(q, rb))
    if objective == "pg":
        return float(pg_loss(q.view(valid.shape), rb.view(valid.shape), valid, temperature=temperature))
    win, lose = _preference_pairs(rb.view(valid.shape), valid)
    return float(preference_loss(q[win], q[lose]))


def has_reward_signal(rewards: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether some prompt (``groups`` id) has two samples of different ``rewards``: without one,
    the policy-gradient and preference objectives have zero gradient and nothing can be learned."""
    _, inverse = torch.unique(groups.cpu(), return_inverse=True)
    r = rewards.detach().cpu().float().reshape(-1)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full((n,), -math.inf).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((n,), math.inf).scatter_reduce(0, inverse, r, "amin")
    return bool((hi > lo).any())


def fit_probe(
    features: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor | None = None,
    objective: str = "pg",
    *,
    hidden: Sequence[int] = (),
    lr: float = 5e-5,
    epochs: int = 150,
    batch_size: int = 1000,
    weight_decay: float = 0.0,
    group_size: int = 10,
    temperature: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> QProbe:
    """Train a :class:`QProbe` on ``features [N, D]`` and ``rewards [N]``.

    ``groups [N]`` names the prompt of each sample; the group objectives (``"pg"``: ``L_PG``,
    ``"preference"``: ``L_QP`` on every pair of a chunk with different rewards) work on disjoint
    chunks of ``group_size`` samples of the same prompt, redrawn every epoch, and a batch holds about
    ``batch_size`` samples in whole chunks. ``"mse"`` (``L_Q``) and ``"bce"`` (``L_CE``) use plain
    shuffled batches. ``standardize`` fits the probe on ``(phi - mean) / std`` of the training
    features (an affine change of variables that the probe stores, so the model class is the same;
    it makes one learning rate suit embeddings of any scale). The run is deterministic for a seed.
    Returns the probe in eval mode on ``device``.

    ``engine="auto"`` trains the linear probe with its gradient in closed form and AdamW's update
    written out (the same arithmetic as ``torch.optim.AdamW``, without autograd's per-step
    overhead); MLP probes, and any probe with ``engine="autograd"``, go through autograd and
    ``torch.optim.AdamW``. Both give the same probe up to float rounding (a test checks it).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, value in (("features", features), ("rewards", rewards)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be [samples, dim], got shape {tuple(features.shape)}")
    n, dim = features.shape
    if n == 0:
        raise ValueError("features is empty: fitting needs at least one sample")
    if rewards.shape != (n,):
        raise ValueError(f"rewards must have shape ({n},) to match features, got {tuple(rewards.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (math.isfinite(float(weight_decay)) and float(weight_decay) >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    check_temperature(temperature, "temperature")
    check_finite(rewards.float(), "rewards")
    if objective == "bce":
        outside = (rewards < 0) | (rewards > 1)
        if bool(outside.any()):
            raise ValueError(f"objective 'bce' needs rewards in [0, 1]; out of range at sample indices "
                             f"{describe_indices(outside)}")
    grouped = objective in ("pg", "preference")
    if grouped:
        if groups is None:
            raise ValueError(f"objective {objective!r} needs groups (the prompt of each sample)")
        _check_groups(groups, "groups", n)
        _check_group_signal(objective, groups, rewards, group_size)
    device = _check_device(device) if device is not None else features.device

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the probe's initial weights
    probe = QProbe(dim, hidden)
    x = features.detach().to(device=device, dtype=torch.float32)
    r = rewards.detach().to(device=device, dtype=torch.float32)
    # A NaN or infinity anywhere makes its column's mean non-finite: one cheap pass decides, and the
    # row-by-row check (which names the samples) runs only then.
    mean = x.mean(dim=0)
    if not bool(torch.isfinite(mean).all()):
        bad_rows = ~torch.isfinite(x).all(dim=1)
        if bool(bad_rows.any()):
            raise ValueError(f"features has NaN or infinite values at sample indices {describe_indices(bad_rows)}")
    if standardize:
        # Standardise once here instead of in every step (in place on the centred copy, so the
        # caller's features are untouched); the probe stores the statistics at the end.
        x = x - mean
        # Column sums of squares in row blocks: small temporaries that stay in cache (a reduction
        # over dim 0 of the whole matrix, as var_mean or vector_norm do it, is several times slower).
        squares = torch.zeros(dim, device=device)
        for block in x.split(4096):
            squares += block.square().sum(dim=0)
        std = squares.div_(n).sqrt_()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        if not bool(torch.isfinite(std).all()):
            raise ValueError("features are too large to standardise in float32 (a column's variance overflows)")
        x.div_(std)
    probe.to(device).train()
    group_ids = groups.detach().cpu().long() if grouped else None
    batches = _batches(x, r, group_ids, objective, batch_size, group_size, generator)

    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc=f"fit Q-probe ({objective})", disable=not progress, leave=False, dynamic_ncols=True)
    if engine not in ("auto", "autograd"):
        raise ValueError(f"engine must be 'auto' or 'autograd', got {engine!r}")
    run = _run_linear if not probe.hidden and engine == "auto" else _run_autograd
    with checks(False):  # the inputs were validated above; no per-step host reads
        run(probe, batches, bar, objective, lr=lr, weight_decay=weight_decay, temperature=temperature,
            progress=progress)
    if standardize:
        probe.set_standardization(mean, std)
    return probe.eval()
