"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``.

Requests take the OpenAI fields that map onto a rollout request, plus the
pruning rule as extra body fields (``min_p``, ``top_k``; ``top_p`` is already
an OpenAI field) and ``return_safe_token_ids`` (the ``openai`` client sends
them with ``extra_body={...}``). OpenAI fields that would change sampling in a
way the rule does not describe (penalties, logit bias, ``best_of``, ``echo``,
``suffix``, tools) are accepted only at their neutral value, so an OpenAI
client gets a 422 naming the field instead of a silently different sampler.

Responses are OpenAI's, with one extension object per choice, ``dvp``
(:class:`DvpChoice`: masked log-probs, log Z_S, safe sizes, optional safe ids,
the policy version), and one per response (:class:`DvpInfo`: engine, rule,
temperature). OpenAI clients ignore them; the ``openai`` package keeps them in
``choice.model_extra["dvp"]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ._base import RequestModel, ResponseModel
from ._text import check_text
from .rollouts import MAX_STOP_STRINGS, SafeTokenIds, Usage
from .rule import MAX_TOP_K, PruningRule
from .score import MAX_SCORE_TOP_LOGPROBS

OpenAIFinishReason = Literal["stop", "length"]


def _neutral(name: str, value: Any, neutral: tuple[Any, ...]) -> Any:
    if value not in neutral:
        raise ValueError(
            f"{name}={value!r} is not supported: dvp-serve samples from the rule's safe set "
            f"only (leave it out or send {neutral[-1]!r})"
        )
    return value


class _OpenAICommon(RequestModel):
    """Fields shared by both OpenAI routes (names and meanings as OpenAI's)."""

    model: str | None = Field(None, description="Model id; checked against the served model.")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    max_tokens: int | None = Field(
        None, ge=1, description="New tokens per choice; null: the server default."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, description="Softmax temperature T; 0 is greedy; null: 1."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Rule step 4 (top-p); null: 1 (no cut)."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed (as /v1/rollouts).")
    stop: str | list[str] | None = Field(None, description="Stop string(s).")
    stream: bool | None = Field(None, description="Not supported on these routes: null/false.")
    stream_options: dict[str, Any] | None = Field(None, description="Ignored (no streaming).")
    user: str | None = Field(None, description="Ignored.")
    presence_penalty: float | None = Field(None, description="Only 0 / null.")
    frequency_penalty: float | None = Field(None, description="Only 0 / null.")
    logit_bias: dict[str, float] | None = Field(None, description="Only {} / null.")
    # DVP extras (openai: extra_body={...}).
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="DVP: rule step 2 (min-p) rho.")
    top_k: int | None = Field(
        None, ge=0, le=MAX_TOP_K, description="DVP: rule step 3 (top-k); 0/null: off."
    )
    return_safe_token_ids: bool = Field(False, description="DVP: return S_t ids per choice.")
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_STRINGS, description="Extra token ids that end a choice."
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        for i, s in enumerate(stops):
            check_text(s, "stop" if isinstance(v, str) else f"stop[{i}]")
        return v

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(
                "stream=true is not supported on the OpenAI routes; use POST /v1/rollouts "
                'with "stream": true for streamed rollouts'
            )
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        return _neutral("penalty", v, (None, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _neutral("logit_bias", v, (None, {}))

    @property
    def rule(self) -> PruningRule:
        """The pruning rule these fields describe."""
        top_p = 1.0 if self.top_p is None else self.top_p
        return PruningRule(min_p=self.min_p, top_k=self.top_k, top_p=top_p)


class CompletionRequest(_OpenAICommon):
    """``POST /v1/completions`` (OpenAI legacy completions).

    Example::

        {"model": "model", "prompt": "Once upon a time", "max_tokens": 16, "n": 2,
         "logprobs": 1, "seed": 0, "min_p": 0.01}
    """

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt(s): text, texts, token ids, or lists of token ids."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_SCORE_TOP_LOGPROBS,
        description="Return log-probs of the sampled tokens and the top-k alternatives.",
    )
    echo: bool | None = Field(None, description="Only false / null.")
    best_of: int | None = Field(None, ge=1, description="Only null or equal to n.")
    suffix: str | None = Field(None, description="Only null.")

    @field_validator("prompt")
    @classmethod
    def _prompt_non_empty(cls, v: Any) -> Any:
        if v == "" or v == [] or (isinstance(v, list) and any(p in ("", []) for p in v)):
            raise ValueError("prompt must not be empty (nor hold an empty prompt)")
        if isinstance(v, str):
            check_text(v, "prompt")
        for i, p in enumerate(v if isinstance(v, list) else ()):
            if isinstance(p, str):
                check_text(p, f"prompt[{i}]")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        return _neutral("echo", v, (None, False))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _neutral("suffix", v, (None,))

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")  # validated before best_of (declared earlier); absent if invalid
        if v is not None and n is not None and v != n:
            raise ValueError(f"best_of={v} is not supported (only best_of == n, here {n})")
        return v


class ChatMessageIn(RequestModel):
    """An OpenAI chat message: text content, or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Speaker; 'developer' is served as 'system'."
    )
    content: str | list[dict[str, Any]] | None = Field(description="Text, or text parts.")
    name: str | None = Field(None, description="Ignored.")
    tool_call_id: str | None = Field(None, description="Ignored.")

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, str):
            check_text(v, "content")
        for i, part in enumerate(v if isinstance(v, list) else ()):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}]: only {{'type': 'text', 'text': str}} parts")
            check_text(part["text"], f"content[{i}].text")
        return v

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p["text"]) for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAICommon):
    """``POST /v1/chat/completions``.

    Example::

        {"model": "model", "messages": [{"role": "user", "content": "What is 7*8?"}],
         "max_tokens": 32, "logprobs": true, "top_logprobs": 2, "min_p": 0.001}
    """

    messages: list[ChatMessageIn] = Field(min_length=1, description="The conversation.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="As max_tokens (the newer name); wins when both are set."
    )
    logprobs: bool | None = Field(None, description="Return log-probs of the sampled tokens.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_SCORE_TOP_LOGPROBS, description="Top-k alternatives per token."
    )
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    tools: list[Any] | None = Field(None, description="Only null / [].")
    tool_choice: Any = Field(None, description="Only null / 'none'.")

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _neutral("response_format", v, (None, {"type": "text"}))

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        return _neutral("tools", v, (None, []))

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        return _neutral("tool_choice", v, (None, "none"))

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):  # logprobs is declared (validated) first
            raise ValueError(f"top_logprobs={v} needs logprobs=true")
        return v


# --- responses ---------------------------------------------------------------------


class DvpChoice(ResponseModel):
    """The DVP extension of one choice: per-step arrays of length T, as in a Rollout."""

    prompt_token_ids: list[int] = Field(description="The prompt as the engine saw it.")
    token_ids: list[int] = Field(description="Generated token ids y_1..y_T.")
    logprobs: list[float | None] | None = Field(None, description="log p(y_t); null if inexact.")
    masked_logprobs: list[float] = Field(description="log pi_S(y_t).")
    safe_logmass: list[float | None] | None = Field(None, description="log Z_S per step.")
    safe_sizes: list[int] = Field(description="|S_t| per step.")
    safe_token_ids: SafeTokenIds | None = Field(None, description="S_t ids, when asked.")
    outside_safe_set: list[int] | None = Field(None, description="Deprecated, always null.")
    stop_reason: str | int | None = Field(None, description="The stop string or id, if any.")
    policy_version: int = Field(description="Weights version every token was sampled with.")
    seed: int | None = Field(None, description="The seed of this choice's generator.")


class DvpInfo(ResponseModel):
    """The DVP extension of a response: how the safe sets were built."""

    engine: str
    temperature: float
    pruning: PruningRule
    policy_version: int


class CompletionLogprobs(ResponseModel):
    """OpenAI's legacy log-probs: one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason
    dvp: DvpChoice


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    dvp: DvpInfo


class TopLogprob(ResponseModel):
    token: str
    logprob: float | None
    bytes: list[int] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float | None = Field(description="log p(y_t); null where not exact.")
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason
    dvp: DvpChoice


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    dvp: DvpInfo
