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
_NUMBER = re.compile(
    rf"(?P<digits>-?\d[\d,]*(?:\.\d+)?)"
    rf"|\b(?P<compound>(?:{_TENS_WORDS})[- ](?:{_UNIT_WORDS}))\b"
    rf"|\b(?P<word>{'|'.join(sorted(_WORDS, key=len, reverse=True))})\b",
    re.IGNORECASE,
)


def _normalize(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion equals the answer up to case and whitespace, else 0.0."""
    return float(_normalize(completion) == _normalize(answer))


def extract_number(text: str, which: str = "last") -> float | None:
    """The first or last number in ``text``: digits (``1,234``, ``-5``, ``2.5``) or English words up to
    ninety-nine (``"twelve"``, ``"forty-two"``); ``None`` when there is none."""
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1] if which == "last" else matches[0]
    if m.group("digits"):
        return float(m.group("digits").replace(",", ""))
    if m.group("compound"):
        tens, unit = re.split(r"[- ]", m.group("compound").lower())
        return float(_WORDS[tens] + _WORDS[unit])
    return float(_WORDS[m.group("word").lower()])


def numeric_match(completion: str, answer: float | str, *, which: str = "last", tolerance: float = 1e-6) -> float:
    """1.0 when the completion's first or last number equals ``answer`` (within ``tolerance``), else 0.0."""
    target = float(answer)
    if not math.isfinite(target):
        raise ValueError(f"answer must be a finite number, got {answer!r}")
    found = extract_number(completion, which)
    return float(found is not None and abs(found - target) <= tolerance)
