"""POST /v1/rollouts: request and columnar response.

A response holds one :class:`Rollout` per (prompt, sample); every per-step
quantity is an array indexed by generated-token position t (columnar: arrays,
not one object per token). Safe sets travel in CSR form (:class:`SafeTokenIds`,
``"list"``) or packed (:class:`PackedSafeTokenIds`, ``"packed"``, as the
request's ``safe_token_ids_format`` asks); in both, a step whose set is the
whole vocabulary is a marker, not V ids.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    field_validator,
    model_validator,
)

from ._base import RequestModel, ResponseModel
from ._text import Text, check_text
from .rule import PruningRule

MAX_STOP_STRINGS = 16

SafeTokenIdsFormat = Literal["list", "packed"]
"""How safe sets travel: ``"list"`` (CSR of plain ids) or ``"packed"`` (bytes)."""


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool"] = Field(description="Speaker.")
    content: Text = Field(description="Message text.")


TokenIds = Annotated[list[int], Field(min_length=1, description="Prompt as token ids.")]
ChatPrompt = Annotated[
    list[ChatMessage],
    Field(min_length=1, description="Chat messages; the server applies the chat template."),
]
Prompt = str | TokenIds | ChatPrompt


class SamplingOptions(RequestModel):
    """How to sample. Precedence for each field: request -> server default."""

    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description="Softmax temperature T; 0 is greedy (S = {argmax})."
    )
    max_tokens: int = Field(256, ge=1, description="New tokens per rollout, at most.")
    stop: list[Text] | None = Field(
        None,
        max_length=MAX_STOP_STRINGS,
        description="Stop strings; the text stops before the string, the token ids include "
        "the token that completed it.",
    )
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_STRINGS, description="Extra token ids that end a rollout."
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Seed. Sample j of a prompt uses a generator derived from (seed, j), so "
        "the same request gives the same tokens.",
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class RolloutRequest(RequestModel):
    """Sample ``n`` rollouts for each prompt under the pruning rule.

    Example::

        {"prompts": ["What is 7*8?"], "n": 4,
         "sampling": {"max_tokens": 64, "seed": 0},
         "pruning": {"min_p": 0.001},
         "return_safe_token_ids": true}
    """

    prompts: list[Prompt] = Field(
        min_length=1, description="Prompts: text, token ids, or chat messages (may be mixed)."
    )
    n: int = Field(1, ge=1, description="Samples per prompt.")
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    pruning: PruningRule = Field(default_factory=PruningRule)
    return_safe_token_ids: bool = Field(
        False, description="Return the ids of every step's safe set (CSR)."
    )
    safe_token_ids_format: SafeTokenIdsFormat = Field(
        "list",
        description='How the safe sets travel: "list" (CSR of plain ids) or "packed" (bitmaps '
        "and delta varints as bytes: base64 in JSON, bin in msgpack; docs/protocol.md). In "
        "both, a set that is the whole vocabulary is a marker, not V ids.",
    )
    return_text: bool = Field(True, description="Return the decoded completion text.")
    model: str | None = Field(None, description="Model id; checked against the served model.")
    stream: bool = Field(
        False,
        description="Stream the rollouts as they decode: NDJSON lines (see dvp_schemas.stream) "
        "instead of one RolloutResponse.",
    )

    @field_validator("prompts")
    @classmethod
    def _no_empty_text(cls, v: list[Prompt]) -> list[Prompt]:
        for i, p in enumerate(v):
            if isinstance(p, str) and p == "":
                raise ValueError(f"prompts[{i}] is an empty string")
            if isinstance(p, str):
                check_text(p, f"prompts[{i}]")
        return v


class SafeTokenIds(ResponseModel):
    """Safe sets of every step in CSR form: the set of step t is
    ``ids[offsets[t]:offsets[t+1]]`` (sorted ascending); ``len(offsets) == T + 1``.

    An empty row is the whole vocabulary ``0 .. vocab_size - 1`` (the rule pruned
    nothing at that step; ``safe_sizes[t] == vocab_size``): a real set is never
    empty, since it holds the sampled token.
    """

    format: Literal["list"] = Field("list", description='Always "list".')
    ids: list[int] = Field(description="Flat token ids of all steps' safe sets.")
    offsets: list[int] = Field(description="Row offsets into ids; length T + 1.")
    vocab_size: int | None = Field(
        None, description="V: an empty row is the set 0 .. V - 1 (the whole vocabulary)."
    )

    @model_validator(mode="after")
    def _check_csr(self) -> SafeTokenIds:
        if not self.offsets or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")
        if any(b < a for a, b in zip(self.offsets, self.offsets[1:], strict=False)):
            raise ValueError("offsets must be non-decreasing")
        return self

    def step(self, t: int) -> list[int]:
        """The safe set of step t (the whole vocabulary for an empty row)."""
        row = self.ids[self.offsets[t] : self.offsets[t + 1]]
        if not row and self.vocab_size is not None:
            return list(range(self.vocab_size))
        return row


def _base64_in(value: object) -> object:
    """Bytes from a JSON string (standard or URL-safe base64); bytes pass through."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not base64: {exc}") from exc
    return value


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_base64_in),
    PlainSerializer(
        lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"
    ),
]
"""Bytes on the wire: a standard base64 string in JSON, raw (msgpack bin) otherwise."""


class PackedSafeTokenIds(ResponseModel):
    """Safe sets of every step, packed (docs/protocol.md, section 1).

    With ``s_t = safe_sizes[t]`` and ``B = ceil(vocab_size / 8)``: a step with
    ``s_t == vocab_size`` is the whole vocabulary and takes no bytes; a step with
    ``B <= s_t < vocab_size`` is a bitmap of B bytes (bit v % 8 of byte v // 8,
    least significant first); any other step is s_t unsigned LEB128 varints, the
    first id and then each id minus the previous one. ``data`` holds every bitmap
    in step order, then every varint in step order. ``dvp_client.safe_ids`` encodes
    and decodes it (numpy).
    """

    format: Literal["packed"] = Field("packed", description='Always "packed".')
    vocab_size: int = Field(ge=1, description="V, which decides each step's kind with |S_t|.")
    data: Base64Bytes = Field(description="Bitmaps, then varints (base64 in JSON).")


def _format_of(value: object) -> str:
    """The ``format`` tag of safe sets; absent (servers before "packed") means "list"."""
    if isinstance(value, dict):
        return str(value.get("format", "list"))
    return str(getattr(value, "format", "list"))


AnySafeTokenIds = Annotated[
    Annotated[SafeTokenIds, Tag("list")] | Annotated[PackedSafeTokenIds, Tag("packed")],
    Discriminator(_format_of),
]
"""The safe sets of a rollout or a stream chunk, in either format (tagged by ``format``)."""


FinishReason = Literal["stop", "length", "abort", "error"]


class Rollout(ResponseModel):
    """One sampled completion with its per-step DVP metadata (arrays of length T)."""

    prompt_index: int = Field(description="Index into the request's prompts.")
    sample_index: int = Field(description="0..n-1 within its prompt.")
    prompt_token_ids: list[int] = Field(description="The prompt as the engine saw it.")
    token_ids: list[int] = Field(description="Generated token ids y_1..y_T.")
    text: str | None = Field(None, description="Decoded completion (stop string removed).")
    logprobs: list[float | None] | None = Field(
        None,
        description="log p(y_t) under the full tempered distribution; null where the "
        "engine cannot give it exactly.",
    )
    masked_logprobs: list[float] = Field(
        description="log pi_S(y_t): the log-prob renormalised over the safe set."
    )
    safe_logmass: list[float | None] | None = Field(
        None, description="log Z_S = logsumexp over S of the tempered log-probs (<= 0)."
    )
    safe_sizes: list[int] = Field(description="|S_t| per step.")
    safe_token_ids: AnySafeTokenIds | None = Field(None, description="S_t ids, when asked.")
    finish_reason: FinishReason = Field(description="Why the rollout ended.")
    stop_reason: str | int | None = Field(
        None, description="The stop string or token id that ended it, if any."
    )
    policy_version: int = Field(
        description="Weights version the first token was sampled with: every token's, "
        "unless version_spans has more than one span (an in-flight update, keep or "
        "recompute)."
    )
    version_spans: list[tuple[int, int, int]] | None = Field(
        None,
        description="[first token index, policy_version, kv_version] per run of tokens "
        "with the same versions, in token order; one span when nothing changed. "
        "policy_version sampled those tokens; kv_version is the oldest version whose "
        "keys / values their context holds (keep: the rollout's prefill; recompute: the "
        "last prefill). Empty for a rollout of no tokens.",
    )
    seed: int | None = Field(None, description="The seed of this sample's generator.")
    outside_safe_set: list[int] | None = Field(
        None,
        description="Deprecated, always null: both engines sample from S exactly (the token "
        "is in S_t at every step). Kept so older clients still parse responses.",
    )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def token_policy_versions(self) -> list[int]:
        """The version that sampled each token (``version_spans`` expanded)."""
        return self._expand(1)

    @property
    def token_kv_versions(self) -> list[int]:
        """The oldest version of the keys / values each token read (spans expanded)."""
        return self._expand(2)

    def _expand(self, field: int) -> list[int]:
        spans = self.version_spans
        if spans is None:  # an older server: one version
            return [self.policy_version] * len(self.token_ids)
        out: list[int] = []
        ends = [s[0] for s in spans[1:]] + [len(self.token_ids)]
        for span, end in zip(spans, ends, strict=True):
            out.extend([span[field]] * (end - span[0]))
        return out


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RolloutResponse(ResponseModel):
    """Rollouts ordered by (prompt_index, sample_index)."""

    id: str = Field(description="Request id (echoes X-Request-Id when given).")
    object: Literal["rollouts"] = "rollouts"
    model: str
    engine: str
    temperature: float = Field(description="The temperature the rollouts were sampled at.")
    pruning: PruningRule = Field(description="The rule the safe sets were built with.")
    policy_version: int
    rollouts: list[Rollout]
    usage: Usage
