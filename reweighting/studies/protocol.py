"""A study's protocol, declared before it runs, and the perturbation that tests a verdict's robustness.

The protocol says what will be decided and how, in one frozen object in the study's module: the
claim, each part (its kind, the effect it should have, the non-inferiority tolerance), the metric,
the settings, how many evidence and selection seeds, every selection rule, the baseline check and
each deviation from the paper's setting with its reason. Its fingerprint (a hash of its canonical
JSON) is written into ``results.json`` and the report, so a reader can tell two runs of the same
protocol from two runs of different ones; ``run_study`` refuses an outcome whose parts are not the
declared ones.

Evidence seeds are ``first_seed .. first_seed + seeds - 1``; selection seeds are
``SELECTION_SEED_BASE + i``, disjoint from them, so no value is chosen on the runs that then decide the
verdict. A study whose seed count was sized from a pilot starts its evidence seeds past the pilot's, so
that no seed of the pilot decides the verdict it was sized for.

Perturbation (``reweighting reproduce --perturb``) changes only floating-point rounding: ``ulp``
moves every initial weight of the studies' models by one unit in the last place (in a fixed
random direction), ``threads`` runs each study with one more intra-op thread (another reduction
order). A verdict that turns under either rested on the last bits of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["PartSpec", "Protocol", "SELECTION_SEED_BASE", "selection_seeds", "PERTURB_ENV", "PERTURBATIONS",
           "perturbation", "perturb_initial_weights"]

SELECTION_SEED_BASE = 1000
PERTURB_ENV = "REWEIGHTING_PERTURB"
PERTURBATIONS = ("ulp", "threads")


@dataclass(frozen=True)
class PartSpec:
    """One declared part of the claim: ``kind`` "better" or "not worse"; ``expected`` the effect the
    paper reports, scaled to this setting (the power label compares the part's MDE with it);
    ``tolerance`` the loss a "not worse" part may have."""

    name: str
    kind: str = "better"
    expected: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("better", "not worse"):
            raise ValueError(f"PartSpec {self.name!r}: kind must be 'better' or 'not worse', got {self.kind!r}")
        if self.kind == "not worse" and self.tolerance is None:
            raise ValueError(f"PartSpec {self.name!r}: a 'not worse' part needs its tolerance")


@dataclass(frozen=True)
class Protocol:
    """What a study decides and how, fixed before it runs (see the module docstring)."""

    claim: str
    metric: str
    parts: tuple[PartSpec, ...]
    seeds: int
    selection_seeds: int = 0
    first_seed: int = 0
    settings: tuple[tuple[str, Any], ...] = ()
    selection: tuple[str, ...] = ()
    baseline: str = ""
    replicates: str = ""
    deviations: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"Protocol: part names must be distinct, got {names}")
        if self.seeds < 1 or self.selection_seeds < 0:
            raise ValueError(f"Protocol: seeds must be >= 1 and selection_seeds >= 0, got {self.seeds}, "
                             f"{self.selection_seeds}")
        if not 0 <= self.first_seed <= SELECTION_SEED_BASE - self.seeds:
            raise ValueError(f"Protocol: the evidence seeds {self.first_seed} .. {self.first_seed + self.seeds - 1} "
                             f"must lie in 0 .. {SELECTION_SEED_BASE - 1}, below the selection seeds")

    def evidence_seeds(self, count: int | None = None) -> list[int]:
        """The evidence seeds: ``count`` of them (default: the declared number) from ``first_seed`` on."""
        n = self.seeds if count is None else count
        if not 1 <= n <= SELECTION_SEED_BASE - self.first_seed:
            raise ValueError(f"the number of evidence seeds must be in 1 .. {SELECTION_SEED_BASE - self.first_seed} "
                             f"(from seed {self.first_seed}, below the selection seeds), got {n}")
        return list(range(self.first_seed, self.first_seed + n))

    def part(self, name: str) -> PartSpec:
        """The declared part called ``name`` (a clear error for an undeclared one)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise ValueError(f"part {name!r} is not declared in the protocol (declared: {[p.name for p in self.parts]})")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.first_seed:
            # evidence seeds from 0 were the only kind once: such a protocol keeps the fingerprint it had
            del d["first_seed"]
        d["settings"] = {k: v for k, v in self.settings}
        d["deviations"] = [{"deviation": a, "reason": b} for a, b in self.deviations]
        return d

    def fingerprint(self) -> str:
        """The first 16 hex digits of the SHA-256 of the protocol's canonical JSON."""
        text = json.dumps(self.as_dict(), sort_keys=True, default=repr, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def selection_seeds(count: int) -> list[int]:
    """The selection seeds: disjoint from the evidence seeds ``0 .. n - 1`` for any n up to 1000."""
    return [SELECTION_SEED_BASE + i for i in range(count)]


def perturbation() -> str | None:
    """The perturbation in force (``REWEIGHTING_PERTURB``), or None; a clear error for an unknown one."""
    value = os.environ.get(PERTURB_ENV, "").strip()
    if not value:
        return None
    if value not in PERTURBATIONS:
        raise ValueError(f"{PERTURB_ENV}={value!r}: expected one of {', '.join(PERTURBATIONS)}")
    return value


@torch.no_grad()
def perturb_initial_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Under ``--perturb ulp``: move every floating-point parameter of ``module`` by one ulp toward
    +inf or -inf (a fixed random sign per element, the same on every machine); else nothing.

    Called by the studies right after a model is initialised; returns ``module``.
    """
    if perturbation() != "ulp":
        return module
    g = torch.Generator().manual_seed(987_654_321)
    for p in module.parameters():
        if not p.is_floating_point():
            continue
        up = torch.rand(p.shape, generator=g) < 0.5
        target = torch.where(up, torch.full(p.shape, float("inf")), torch.full(p.shape, float("-inf")))
        p.copy_(torch.nextafter(p.detach().cpu(), target.to(p.dtype)).to(p.device))
    return module
