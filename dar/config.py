"""`DARConfig`: the knobs of Dynamic Attention Rebalancing, validated on construction."""

from __future__ import annotations

import dataclasses

from .scalars import as_int, as_real

SAMPLING = ("random", "strided")
NORMALIZE = ("joint", "per_image")
THRESHOLDS = ("minmax", "quantile")
MODES = ("key_scale", "prob_scale")
QUERIES = ("generation", "all")

# One line per field, for command-line help (the DARConfig docstring and docs/semantics.md say more).
FIELD_HELP = {
    "num_samples": "generated-image queries scored per batch row",
    "gamma": "strength: boosted keys get weight 1+gamma, damped keys 1-gamma; in [0, 1)",
    "tau_high": "boost keys whose normalised score is >= this (a quantile under thresholds=quantile)",
    "tau_low": "damp keys whose normalised score is <= this (a quantile under thresholds=quantile)",
    "sampling": "how the scored queries are picked",
    "seed": "seed of the 'random' sampler",
    "normalize": "one min-max over all reference keys (joint) or one per reference image",
    "thresholds": "minmax: the taus are thresholds on the normalised score; quantile: quantiles of it",
    "mode": "key_scale multiplies the logits by w (the published formula); prob_scale adds ln w",
    "queries": "which query rows are rebalanced: the generated image's, or all",
}
CHOICES = {"sampling": SAMPLING, "normalize": NORMALIZE, "thresholds": THRESHOLDS, "mode": MODES,
           "queries": QUERIES}


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"DARConfig.{name} must be one of {allowed}, got {value!r}")


# torch.Generator.manual_seed takes seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    value = as_int(f"DARConfig.{name}", value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"DARConfig.{name} must be {allowed}, got {value}")
    return value


def _check_real(name: str, value) -> float:
    return as_real(f"DARConfig.{name}", value)


@dataclasses.dataclass(frozen=True)
class DARConfig:
    """Configuration of one DAR call; see docs/semantics.md for the exact meaning of each field.

    num_samples: how many generated-image queries are scored per batch row (``m = min(num_samples, |P|)``).
    gamma:       strength; boosted keys get weight ``1 + gamma``, damped keys ``1 - gamma``. ``[0, 1)``.
    tau_high, tau_low: thresholds on the min-max normalised score ``r̂`` (``0 <= tau_low < tau_high <= 1``).
    sampling:    ``"random"`` (seeded, CPU generator) or ``"strided"`` (evenly spaced) query sampling.
    seed:        seed of the ``"random"`` sampler, ``0 <= seed < 2**64`` (torch.Generator's range).
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
        # Numbers are stored as Python int / float (numpy and 0-d tensor scalars are converted), so a
        # config hashes and compares by value.
        object.__setattr__(self, "num_samples", _check_int("num_samples", self.num_samples, 1))
        object.__setattr__(self, "seed", _check_int("seed", self.seed, 0, MAX_SEED))
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
        for name, value in (("gamma", gamma), ("tau_high", hi), ("tau_low", lo)):
            object.__setattr__(self, name, value)
        _check_choice("sampling", self.sampling, SAMPLING)
        _check_choice("normalize", self.normalize, NORMALIZE)
        _check_choice("thresholds", self.thresholds, THRESHOLDS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("queries", self.queries, QUERIES)

    def replace(self, **changes) -> "DARConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
