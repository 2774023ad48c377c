"""The policy loss's options, shared by the torch and JAX losses (no torch, no jax).

``Correction`` and ``Aggregation`` are the one registry of loss variants, and
:class:`LossOptions` the one declaration and validation of the options both losses
take; each framework's ``PolicyLossConfig`` is a ``LossOptions`` (the torch one adds
``max_staleness``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

__all__ = ["Aggregation", "Correction", "LossOptions", "parse_enum"]


class Correction(str, Enum):
    """Behaviour correction between the trainer's old policy and the engine."""

    NONE = "none"
    TOKEN_TIS = "token-tis"
    SEQ_TIS = "seq-tis"
    TOKEN_MIS = "token-mis"
    SEQ_MIS = "seq-mis"
    ICEPOP = "icepop"


class Aggregation(str, Enum):
    """How per-token losses become one scalar (see the losses' module docstrings)."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"


E = TypeVar("E", bound=Enum)


def parse_enum(cls: type[E], value: object, name: str) -> E:
    """``cls(value)``, or a ValueError naming ``name`` and the allowed values."""
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None


@dataclass(frozen=True)
class LossOptions:
    """The clip, correction and aggregation options of the policy loss, validated at
    construction (frozen, hashable).

    Attributes:
        eps_low: lower clip, ratio >= 1 - eps_low; in [0, 1).
        eps_high: upper clip, ratio <= 1 + eps_high; > 0 (DAPO uses 0.28).
        correction: a :class:`Correction` or its string value.
        cap: C for TIS / MIS; >= 1 (verl's default threshold is 2).
        icepop_low, icepop_high: IcePop band [a, b], 0 < a <= 1 <= b.
        aggregation: an :class:`Aggregation` or its string value.

    Raises:
        ValueError: a value out of range, or an unknown variant (the message names
            the field).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    correction: Correction = Correction.NONE
    cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    aggregation: Aggregation = Aggregation.TOKEN_MEAN

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "correction", parse_enum(Correction, self.correction, "correction")
        )
        object.__setattr__(
            self, "aggregation", parse_enum(Aggregation, self.aggregation, "aggregation")
        )
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if not self.eps_high > 0.0 or math.isinf(self.eps_high):
            raise ValueError(f"eps_high must be positive and finite, got {self.eps_high}")
        if not self.cap >= 1.0 or math.isinf(self.cap):
            raise ValueError(f"cap must be >= 1 and finite, got {self.cap}")
        if not 0.0 < self.icepop_low <= 1.0 <= self.icepop_high < math.inf:
            raise ValueError(
                "icepop band must satisfy 0 < icepop_low <= 1 <= icepop_high < inf, "
                f"got [{self.icepop_low}, {self.icepop_high}]"
            )
