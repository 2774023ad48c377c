"""Prompt text: the cheap length bound checked before tokenizing, and when to offload.

Tokenizing a 50 MB text prompt took 46-52 s; on the event loop it froze every
other request. Two things keep that from happening
(:meth:`RolloutService.prompt_ids <dvp_server.service.serving.RolloutService.prompt_ids>`):

1. A bound that needs no tokenizer. No token covers more bytes than the longest
   entry of the vocabulary (``L`` bytes, :func:`longest_token_bytes`), and a
   character is at least one byte, so a text of more than ``L * max_prompt_tokens``
   characters has more than ``max_prompt_tokens`` tokens: it is refused (422
   naming the prompt) before it is tokenized. A tokenizer with a normalizer
   (which may compose characters, up to 3 into 1) gets a slack factor of
   :data:`NORMALIZER_SLACK`. Chat prompts are bounded by their contents' total.
2. Prompts that pass it and are still long (over :data:`INLINE_CHARS` in all)
   are tokenized, chat-templated and checked in a worker thread. The fast
   (Rust) tokenizer releases the GIL while it encodes (measured: the loop kept
   ticking every 40 ms or better while a 2 MB text was tokenized beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dvp_schemas import ChatMessage, Prompt

from ..errors import validation_error

__all__ = [
    "INLINE_CHARS",
    "NORMALIZER_SLACK",
    "check_text_bound",
    "longest_token_bytes",
    "prompt_chars",
    "text_bound",
]

INLINE_CHARS = 32 << 10  # prompts tokenized on the loop up to this many characters in all
NORMALIZER_SLACK = 4  # a normalizer may compose characters (NFC/NFKC: at most 3 -> 1)


def longest_token_bytes(tokenizer: Any) -> int:
    """Bytes of the longest vocabulary entry, an upper bound on what one token covers.

    Entries are counted as UTF-8 of their written form, which is never shorter
    than what they cover (byte-level BPE writes a byte as one or two bytes of
    UTF-8, SentencePiece writes a space as the three of ``'\u2581'``).
    """
    vocab = tokenizer.get_vocab()
    return max((len(str(tok).encode("utf-8", "replace")) for tok in vocab), default=1)


def text_bound(tokenizer: Any, max_prompt_tokens: int) -> int:
    """Most characters a prompt of ``max_prompt_tokens`` tokens can hold (module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = backend is not None and backend.normalizer is None
    slack = 1 if plain else NORMALIZER_SLACK
    return longest_token_bytes(tokenizer) * max_prompt_tokens * slack


def _chars(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.content) for m in prompt if isinstance(m, ChatMessage))


def prompt_chars(prompts: Sequence[Prompt]) -> int:
    """Characters of text in all prompts (token-id prompts count as none)."""
    return sum(_chars(p) for p in prompts)


def check_text_bound(prompts: Sequence[Prompt], bound: int, max_prompt_tokens: int) -> None:
    """422 naming ``prompts.<i>`` for the first text or chat prompt over ``bound`` characters.

    Raises:
        ServiceError: the prompt cannot fit ``max_prompt_tokens`` tokens.
    """
    for i, prompt in enumerate(prompts):
        if (n := _chars(prompt)) > bound:
            raise validation_error(
                f"prompts.{i}",
                f"prompt text of {n} characters is over the limit of {max_prompt_tokens} "
                f"tokens: at most {bound} characters fit in that many tokens of this model "
                "(bounded by its longest vocabulary entry); refused without tokenizing",
            )
