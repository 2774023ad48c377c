"""Small types shared by the HTTP client: the ``NOT_GIVEN`` sentinel and aliases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Literal, TypeAlias, TypeVar

import httpx
from dvp_schemas import ChatMessage

_T = TypeVar("_T")


class NotGiven:
    """The type of :data:`NOT_GIVEN`: "the caller did not pass this argument".

    ``NOT_GIVEN`` and ``None`` mean different things, and the difference is the
    reason this sentinel exists:

    - ``NOT_GIVEN`` (the default of optional arguments): use the default of the
      level above. For ``timeout=`` that is the client's timeout; for a sampling
      field such as ``temperature=`` the field is left out of the request body,
      so the server's default applies (precedence: request -> server default).
    - ``None``: an explicit value. ``timeout=None`` disables the timeout (as in
      httpx); ``stop=None`` asks for no stop strings; ``seed=None`` asks for an
      unseeded rollout (see :meth:`dvp_client.Client.rollouts`).

    It is falsy, so ``if value:`` treats it like "nothing given".

    Example::

        client.rollouts(prompts, timeout=NOT_GIVEN)  # the client's timeout (default)
        client.rollouts(prompts, timeout=None)       # wait forever
    """

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __reduce__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven()
"""The one :class:`NotGiven` instance: "use the default of the level above"."""

# Parameters that may be NOT_GIVEN.
NotGivenOr: TypeAlias = _T | NotGiven

TimeoutTypes: TypeAlias = float | httpx.Timeout | None
"""Seconds for every phase, an ``httpx.Timeout`` per phase, or ``None`` for no limit."""

Headers: TypeAlias = Mapping[str, str]

PromptInput: TypeAlias = str | Sequence[int] | Sequence[ChatMessage | Mapping[str, str]]
"""One prompt: text, token ids, or chat messages (models or ``{"role", "content"}`` dicts)."""
