"""Text the server can encode: the one check every text field of a request passes.

JSON can carry a lone UTF-16 surrogate (``"\\ud800"``): it is valid JSON and a
valid Python ``str``, but it is not Unicode text, so UTF-8 (and every
tokenizer) refuses it. A request holding one is refused at validation, a 422
naming the field, before any tokenizer, template or engine sees it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["Text", "check_text", "text_problem"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why ``value`` is not encodable text (a lone surrogate and where), or None.

    ASCII text is answered without a scan (``str.isascii`` is O(1) in CPython).
    """
    if value.isascii():
        return None
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"holds a lone UTF-16 surrogate U+{ord(found.group()):04X} at character "
        f"{found.start()}, which is not valid Unicode text (send UTF-8 text)"
    )


def check_text(value: str, name: str = "text") -> str:
    """``value`` unchanged when it is encodable text.

    Raises:
        ValueError: ``"<name> holds a lone UTF-16 surrogate ..."``.
    """
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    return value


Text = Annotated[str, AfterValidator(check_text)]
"""A ``str`` field that must be encodable text (a 422 at the field otherwise)."""
