"""Client side of streamed rollouts: decode the stream's events and join them.

A stream (``POST /v1/rollouts`` with ``"stream": true``, see
:mod:`dvp_schemas.stream`) is NDJSON, or concatenated msgpack maps when the
client asked for msgpack. :class:`EventDecoder` turns the body's bytes, fed as
they arrive, into :class:`~dvp_schemas.RolloutStreamChunk` and
:class:`~dvp_schemas.RolloutStreamSummary` objects; an ``error`` event raises
:class:`~dvp_client.APIStreamError`. :func:`join_rollout_stream` joins the
events of a whole stream into the :class:`RolloutBatch` the same request
returns without streaming.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pydantic
from dvp_schemas import (
    Rollout,
    RolloutStreamChunk,
    RolloutStreamError,
    RolloutStreamEvent,
    RolloutStreamSummary,
    SafeTokenIds,
)

from ._exceptions import APIResponseValidationError, APIStreamError
from .batch import RolloutBatch
from .safe_ids import as_list_form

__all__ = ["EventDecoder", "StreamEvent", "join_rollout_stream"]

StreamEvent = RolloutStreamChunk | RolloutStreamSummary
"""What a rollout stream yields: chunks as they decode, then one summary."""

_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RolloutStreamEvent)


class EventDecoder:
    """Bytes of a rollout stream in, events out (NDJSON or msgpack, per the response).

    Args:
        response: the streamed response (its content type picks the format; it is
            also what errors carry).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        content_type = response.headers.get("content-type", "")
        self._unpacker: Any = None
        if "msgpack" in content_type:
            import msgpack

            self._unpacker = msgpack.Unpacker(raw=False)
        self._buffer = b""
        self.summary_seen = False

    def feed(self, data: bytes) -> Iterator[StreamEvent]:
        """The events completed by ``data``.

        Raises:
            APIStreamError: an ``error`` event (the server failed after the stream began).
            APIResponseValidationError: an event that does not fit the schema.
        """
        if self._unpacker is not None:
            self._unpacker.feed(data)
            for obj in self._unpacker:
                yield self._event(obj)
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield self._event(line)

    def finish(self) -> Iterator[StreamEvent]:
        """The last event when the body did not end with a newline; then check the end.

        Raises:
            APIResponseValidationError: the stream ended before its summary (the
                connection was cut, or the server died mid-stream).
        """
        if self._buffer.strip():
            line, self._buffer = self._buffer, b""
            yield self._event(line)
        if not self.summary_seen:
            raise APIResponseValidationError(
                self.response, None, "rollout stream ended before its summary"
            )

    def _event(self, raw: bytes | object) -> StreamEvent:
        try:
            event = (
                _EVENT.validate_json(raw) if isinstance(raw, bytes) else _EVENT.validate_python(raw)
            )
        except pydantic.ValidationError as err:
            raise APIResponseValidationError(
                self.response, raw, f"rollout stream: bad event: {err}"
            ) from err
        if isinstance(event, RolloutStreamError):
            raise APIStreamError(self.response, event.error)
        if isinstance(event, RolloutStreamChunk) and event.safe_token_ids is not None:
            try:  # packed sets decoded here, so chunks and the joined batch hold CSR
                event.safe_token_ids = as_list_form(event.safe_token_ids, event.safe_sizes)
            except ValueError as err:
                raise APIResponseValidationError(
                    self.response, raw, f"rollout stream: bad safe sets: {err}"
                ) from err
        self.summary_seen = self.summary_seen or isinstance(event, RolloutStreamSummary)
        return event  # type: ignore[no-any-return]


def join_rollout_stream(events: Iterable[StreamEvent]) -> RolloutBatch:
    """Join a whole stream's events into the batch the non-streamed request returns.

    Args:
        events: every event of one stream, in the order received.

    Raises:
        ValueError: the events are not one complete stream (no summary, a chunk out
            of order, a rollout without its chunks); the message names the rollout.
    """
    chunks: dict[tuple[int, int], list[RolloutStreamChunk]] = {}
    summary: RolloutStreamSummary | None = None
    for event in events:
        if isinstance(event, RolloutStreamSummary):
            summary = event
            continue
        key = (event.prompt_index, event.sample_index)
        have = chunks.setdefault(key, [])
        done = sum(len(c.token_ids) for c in have)
        if event.start != done:
            raise ValueError(f"rollout {key}: chunk starts at step {event.start}, expected {done}")
        have.append(event)
    if summary is None:
        raise ValueError("the stream ended without its summary")
    rollouts = [
        _join_rollout(end, chunks.get((end.prompt_index, end.sample_index), []))
        for end in summary.rollouts
    ]
    return RolloutBatch(
        id=summary.id,
        model=summary.model,
        engine=summary.engine,
        temperature=summary.temperature,
        pruning=summary.pruning,
        policy_version=summary.policy_version,
        rollouts=rollouts,
        usage=summary.usage,
    )


def _join_rollout(end: Any, chunks: list[RolloutStreamChunk]) -> Rollout:
    key = (end.prompt_index, end.sample_index)
    if sum(len(c.token_ids) for c in chunks) != end.num_tokens:
        raise ValueError(f"rollout {key}: chunks hold fewer tokens than its {end.num_tokens}")

    def cat(name: str) -> list[Any] | None:
        parts = [getattr(c, name) for c in chunks]
        if not parts or any(p is None for p in parts):
            return None
        return [x for p in parts for x in p]

    safe = None
    if chunks and all(c.safe_token_ids is not None for c in chunks):
        ids: list[int] = []
        offsets = [0]
        vocab_size = None
        for c in chunks:
            st = as_list_form(c.safe_token_ids, c.safe_sizes)  # type: ignore[arg-type]
            offsets += [len(ids) + o for o in st.offsets[1:]]
            ids += st.ids
            vocab_size = st.vocab_size if st.vocab_size is not None else vocab_size
        safe = SafeTokenIds(ids=ids, offsets=offsets, vocab_size=vocab_size)
    return Rollout(
        prompt_index=end.prompt_index,
        sample_index=end.sample_index,
        prompt_token_ids=end.prompt_token_ids,
        token_ids=cat("token_ids") or [],
        text=end.text,
        logprobs=cat("logprobs"),
        masked_logprobs=cat("masked_logprobs") or [],
        safe_logmass=cat("safe_logmass"),
        safe_sizes=cat("safe_sizes") or [],
        safe_token_ids=safe,
        finish_reason=end.finish_reason,
        stop_reason=end.stop_reason,
        policy_version=end.policy_version,
        version_spans=_join_spans(chunks),
        seed=end.seed,
        outside_safe_set=cat("outside_safe_set"),
    )


def _join_spans(chunks: list[RolloutStreamChunk]) -> list[tuple[int, int, int]] | None:
    """The chunks' version spans as one rollout's (a run across chunks is one span)."""
    if any(c.version_spans is None for c in chunks):
        return None
    out: list[tuple[int, int, int]] = []
    for c in chunks:
        for i, pv, kv in c.version_spans or []:
            if not out or (out[-1][1], out[-1][2]) != (pv, kv):
                out.append((i, pv, kv))
    return out
