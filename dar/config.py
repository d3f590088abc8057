"""`DARConfig`: the knobs of Dynamic Attention Rebalancing, validated on construction."""

from __future__ import annotations

import dataclasses
import math

SAMPLING = ("random", "strided")
NORMALIZE = ("joint", "per_image")
THRESHOLDS = ("minmax", "quantile")
MODES = ("key_scale", "prob_scale")
QUERIES = ("generation", "all")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"DARConfig.{name} must be one of {allowed}, got {value!r}")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"DARConfig.{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"DARConfig.{name} must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DARConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"DARConfig.{name} must be >= {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class DARConfig:
    """Configuration of one DAR call; see docs/semantics.md for the exact meaning of each field.

    num_samples: how many generated-image queries are scored per batch row (``m = min(num_samples, |P|)``).
    gamma:       strength; boosted keys get weight ``1 + gamma``, damped keys ``1 - gamma``. ``[0, 1)``.
    tau_high, tau_low: thresholds on the min-max normalised score ``r̂`` (``0 <= tau_low < tau_high <= 1``).
    sampling:    ``"random"`` (seeded, CPU generator) or ``"strided"`` (evenly spaced) query sampling.
    seed:        seed of the ``"random"`` sampler.
    normalize:   ``"joint"`` (one group over all reference keys) or ``"per_image"`` (one group per range).
    thresholds:  ``"minmax"`` (compare ``r̂`` to the taus, the published method) or ``"quantile"``.
    mode:        ``"key_scale"`` (logits ``s * w``, the published formula) or ``"prob_scale"`` (``s + ln w``).
    queries:     which query rows are rebalanced: ``"generation"`` (the gen ranges) or ``"all"``.
    """

    num_samples: int = 64
    gamma: float = 0.15
    tau_high: float = 0.7
    tau_low: float = 0.3
    sampling: str = "random"
    seed: int = 0
    normalize: str = "joint"
    thresholds: str = "minmax"
    mode: str = "key_scale"
    queries: str = "generation"

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, 1)
        _check_int("seed", self.seed, 0)
        gamma = _check_real("gamma", self.gamma)
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"DARConfig.gamma must be in [0, 1), got {self.gamma!r}")
        hi = _check_real("tau_high", self.tau_high)
        lo = _check_real("tau_low", self.tau_low)
        for name, tau in (("tau_high", hi), ("tau_low", lo)):
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"DARConfig.{name} must be in [0, 1], got {tau!r}")
        if lo >= hi:
            raise ValueError(f"DARConfig.tau_low must be < tau_high, got tau_low={lo!r}, tau_high={hi!r}")
        _check_choice("sampling", self.sampling, SAMPLING)
        _check_choice("normalize", self.normalize, NORMALIZE)
        _check_choice("thresholds", self.thresholds, THRESHOLDS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("queries", self.queries, QUERIES)

    def replace(self, **changes) -> "DARConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
