"""The policy loss's named options, shared by the torch and JAX losses (no torch, no jax).

``Correction`` and ``Aggregation`` are the one registry of loss variants; each
framework's ``PolicyLossConfig`` validates its fields with :func:`parse_enum`.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["Aggregation", "Correction", "parse_enum"]


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
