"""The Q-probe: a linear (or small MLP) head on embeddings, ``Q(x, a) = theta . phi(x, a) + b``.

docs/methods/qprobe.md. ``phi(x, a)`` is an embedding of a prompt and one completion (a hidden state
of the base model at the last completion token, or an API embedding). Inputs are standardised
with a per-feature mean and scale kept as buffers, so a probe saved to disk carries everything it
needs to score new features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..checks import checks_enabled, describe_indices

__all__ = ["QProbe"]


class QProbe(nn.Module):
    """``Q(phi) = theta . ((phi - mean) / scale) + b``, or a small MLP when ``hidden`` is not empty.

    ``dim`` is the embedding size; ``hidden`` the widths of the MLP's hidden layers (ReLU), empty for
    the paper's linear probe. ``mean`` and ``scale`` default to 0 and 1 (no standardisation);
    :func:`~reweighting.qprobe.fit_probe` sets them from the training features when asked.
    ``forward(features [..., dim]) -> Q [...]`` (float32).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = ()):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an integer, got {dim!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        if isinstance(hidden, (str, bytes)) or any(isinstance(h, bool) or not isinstance(h, int) for h in hidden):
            raise TypeError(f"hidden must be a sequence of integer widths, got {hidden!r}")
        hidden = tuple(hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden!r}")
        self.dim = int(dim)
        self.hidden = hidden
        layers: list[nn.Module] = []
        width = self.dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))

    @classmethod
    def constant(cls, dim: int, hidden: Sequence[int] = ()) -> QProbe:
        """A probe with every weight and bias zero: ``Q = 0`` for every sample, so a choice by it
        (at any beta) is a uniform choice among the k samples, and its expected reward is pass@1.
        The probe to use when the training prompts carry no reward signal to learn from."""
        probe = cls(dim, hidden)
        with torch.no_grad():
            for parameter in probe.parameters():
                parameter.zero_()
        return probe

    def set_standardization(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Use ``(phi - mean) / scale`` as the probe's input (``scale`` entries must be > 0)."""
        if mean.shape != (self.dim,) or scale.shape != (self.dim,):
            raise ValueError(f"mean and scale must have shape ({self.dim},), got {tuple(mean.shape)}, "
                             f"{tuple(scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be > 0 for every feature")
        self.mean.copy_(mean.float())
        self.scale.copy_(scale.float())

    def _check_features(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor [..., {self.dim}], got {type(features).__name__}")
        if features.dim() == 0 or features.shape[-1] != self.dim:
            raise ValueError(f"features must have last dimension {self.dim} (the probe's input width), got shape "
                             f"{tuple(features.shape)}")
        if features.is_complex() or features.dtype == torch.bool:
            raise TypeError(f"features must be real floating point, got dtype {features.dtype}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._check_features(features)
        x = (features.to(self.mean.dtype) - self.mean) / self.scale
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def score(self, features: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Detached float32 ``Q`` for many features ``[..., dim] -> [...]``, in batches (no graph kept).

        Features with NaN or infinite values are refused (they would give NaN scores), naming the
        flat row indices; the check obeys ``reweighting.set_checks``.
        """
        self._check_features(features)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        flat = features.reshape(-1, self.dim)
        if checks_enabled():
            bad = ~torch.isfinite(flat).all(dim=1)
            if bool(bad.any()):
                raise ValueError(f"features has NaN or infinite values at rows {describe_indices(bad)} "
                                 f"(of features.reshape(-1, {self.dim}))")
        out = torch.cat([self(flat[i:i + batch_size]) for i in range(0, flat.shape[0], batch_size)]) \
            if flat.shape[0] else flat.new_zeros(0)
        return out.reshape(features.shape[:-1]).float()

    def save(self, path: str | Path) -> None:
        """Write the probe (weights, standardisation and shape) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"qprobe": json.dumps({"dim": self.dim, "hidden": list(self.hidden)})})

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> QProbe:
        """Read a probe written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"no probe file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("qprobe")
        except Exception as err:  # safetensors has its own error type for a file that is not safetensors
            raise ValueError(f"{path} is not a Q-probe file (not safetensors: {err})") from None
        if meta is None:
            raise ValueError(f"{path} is not a Q-probe file (no 'qprobe' metadata)")
        try:
            shape = json.loads(meta)
            probe = cls(shape["dim"], shape["hidden"])
            probe.load_state_dict(load_file(str(path), device=str(map_location)))
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"{path} is not a valid Q-probe file: {err}") from None
        return probe
