"""Verifiable rewards by answer matching: exact text match, and numeric match of the final answer.

Code execution against tests, the other verifiable reward, is in :mod:`reweighting.qprobe.sandbox`.
"""

from __future__ import annotations

import math
import re

__all__ = ["exact_match", "extract_number", "numeric_match"]

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_TENS_WORDS = "|".join(_TENS)
_UNIT_WORDS = "|".join(_UNITS[1:10])
# A sign is a minus only where it cannot be a hyphen or an operator between two terms: directly
# before the digits and not right after a letter, digit or closing bracket ("10-20" is 10 and 20,
# "x-1" is 1, "(-5)" and "= -5" are -5). Thousands separators are commas between groups of exactly
# three digits ("1,234,567"); any other comma separates numbers ("1,2,3" is 1, 2 and 3). An
# exponent counts only with digits after it ("1.5e3" is 1500, "2eggs" is 2).
_NUMBER = re.compile(
    r"(?P<digits>(?:(?<![\w)\]])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    rf"|\b(?P<compound>(?:{_TENS_WORDS})[- ](?:{_UNIT_WORDS}))\b"
    rf"|\b(?P<word>{'|'.join(sorted(_WORDS, key=len, reverse=True))})\b",
    re.IGNORECASE,
)


def _normalize(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion equals the answer up to case and whitespace, else 0.0."""
    for name, value in (("completion", completion), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return float(_normalize(completion) == _normalize(answer))


def extract_number(text: str, which: str = "last") -> float | None:
    """The first or last number in ``text``; ``None`` when there is none.

    A number is written in digits or in English words up to ninety-nine (``"twelve"``,
    ``"forty-two"``). In digits: an optional minus, the integer part, an optional decimal part
    (``2.5``) and an optional exponent (``1.5e3`` is 1500). The minus counts only right before the
    digits and not right after a letter, a digit or a closing bracket, where it is a hyphen or an
    operator (``"10-20"`` reads 10 and 20, ``"-5"``, ``"(-5)"`` and ``"x = -5"`` read -5; ``"−"``
    counts as a minus). A comma is a thousands separator only between groups of exactly three
    digits (``"1,234,567"``); otherwise it separates numbers (``"1,2,3"`` reads 1, 2 and 3, so the
    last is 3). Fractions are not numbers (``"1/2"`` reads 1 and 2).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1] if which == "last" else matches[0]
    if m.group("digits"):
        return float(m.group("digits").replace(",", "").replace("\u2212", "-"))
    if m.group("compound"):
        tens, unit = re.split(r"[- ]", m.group("compound").lower())
        return float(_WORDS[tens] + _WORDS[unit])
    return float(_WORDS[m.group("word").lower()])


def numeric_match(completion: str, answer: float | str, *, which: str = "last", tolerance: float = 1e-6) -> float:
    """1.0 when the completion's first or last number equals ``answer`` (within ``tolerance``), else 0.0."""
    try:
        target = float(answer)
    except (TypeError, ValueError):
        raise ValueError(f"answer must be a number, got {answer!r}") from None
    if not math.isfinite(target):
        raise ValueError(f"answer must be a finite number, got {answer!r}")
    if not (math.isfinite(float(tolerance)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    found = extract_number(completion, which)
    return float(found is not None and abs(found - target) <= tolerance)
