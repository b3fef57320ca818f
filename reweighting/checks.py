"""Input validation shared by every module: clear errors that name the argument and the samples.

Checks that inspect values (finiteness, signs) read the result back to the host, which is one
synchronisation per call on a GPU. They are on by default because a silent NaN weight poisons a
whole run; a user who has validated the pipeline can switch them off for speed with
``reweighting.set_checks(False)`` (shape checks stay on: they are free).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["set_checks", "checks_enabled", "checks", "check_batch", "check_finite", "check_temperature",
           "check_nonnegative_weights", "check_same_length", "describe_indices", "check_mask",
           "check_positive_number", "check_choice", "check_weight_values", "check_count"]

_ENABLED = True


def set_checks(enabled: bool) -> None:
    """Switch value checks (NaN, infinity, negative weights) on or off for the whole process."""
    global _ENABLED
    if enabled not in (True, False) or isinstance(enabled, str):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__} {enabled!r}")
    _ENABLED = bool(enabled)


def checks_enabled() -> bool:
    """Whether value checks are on."""
    return _ENABLED


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_checks`."""
    previous = _ENABLED
    set_checks(enabled)
    try:
        yield
    finally:
        set_checks(previous)


def describe_indices(mask: torch.Tensor, limit: int = 10) -> str:
    """'[3, 17]' or '[0, 1, 2, ... (40 in all)]' for the True positions of a 1-d mask."""
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()
    shown = ", ".join(str(i) for i in idx[:limit])
    if len(idx) > limit:
        shown += f", ... ({len(idx)} in all)"
    return f"[{shown}]"


def check_batch(x: torch.Tensor, name: str) -> None:
    """A 1-d, non-empty tensor of per-sample values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-d (one value per sample), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: a batch needs at least one sample")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise naming the sample indices where ``x`` is NaN or infinite."""
    if not _ENABLED:
        return
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        kinds = []
        if bool(torch.isnan(x).any()):
            kinds.append("NaN")
        if bool(torch.isinf(x).any()):
            kinds.append("infinite")
        raise ValueError(
            f"{name} has {' and '.join(kinds)} values at sample indices {describe_indices(bad)}"
        )


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """A temperature must be a finite number greater than zero."""
    check_positive_number(temperature, name)


def check_nonnegative_weights(w: torch.Tensor, name: str = "weights", allow_all_zero: bool = False) -> None:
    """Weights must be finite, >= 0 and (unless allowed) not all zero."""
    check_batch(w, name)
    if not _ENABLED:
        return
    check_finite(w, name)
    neg = w.detach() < 0
    if bool(neg.any()):
        raise ValueError(f"{name} has negative values at sample indices {describe_indices(neg)}")
    if not allow_all_zero and not bool((w.detach() > 0).any()):
        raise ValueError(f"{name} are all zero: at least one sample needs a positive weight")


def check_same_length(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    """Two per-sample tensors must have the same length."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has {a.shape[0]} samples but {name_b} has {b.shape[0]}: shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)} do not match"
        )


def check_positive_number(value: float, name: str) -> None:
    """A finite real number > 0 (not a bool, a string or a tensor with several values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (v > 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices`` (the error lists them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_mask(mask: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """A per-sample mask for ``x``: a bool (or integer, nonzero = True) tensor of the same length."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of booleans (True = take part), got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool tensor (True = take part), got dtype {mask.dtype}; "
                        "use mask > 0 to convert")
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {name} has {tuple(x.shape)}: "
                         "one entry per sample is needed")


def check_weight_values(w: torch.Tensor, name: str, require_positive: bool) -> None:
    """Finite, >= 0 and (if asked) not all zero, in one host read; the error names the sample indices."""
    bad = ~torch.isfinite(w) | (w < 0)
    flags = torch.stack([bad.any(), (w > 0).any()]).tolist()
    if flags[0]:
        nan, inf, neg = torch.isnan(w), torch.isinf(w), w < 0
        parts = [f"{kind} values at sample indices {describe_indices(m)}"
                 for kind, m in (("NaN", nan), ("infinite", inf), ("negative", neg)) if bool(m.any())]
        raise ValueError(f"{name} must be finite and >= 0, but has {'; '.join(parts)}")
    if require_positive and not flags[1]:
        raise ValueError(f"{name} are all zero: at least one sample needs a positive weight")


def check_count(value: object, name: str, minimum: int = 0) -> int:
    """An integer ``>= minimum`` (a whole float such as ``3.0`` is accepted); returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
    ):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    n = int(value)
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return n
