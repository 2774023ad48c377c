"""The Engine protocol: what the serving layer needs from a decoding engine.

An engine takes one rollout at a time (a prompt's token ids plus its
:class:`EngineParams`), streams :class:`RolloutChunk` s for it as tokens are
decoded, and can abort it by request id. Engines batch concurrent rollouts
themselves (the torch engine with its scheduler, vLLM with its own), so the
serving layer simply fans a request's prompts x n out as concurrent
``generate`` calls. This is the shape of vLLM's ``AsyncLLM.generate``, so the
vLLM adapter fills it directly.

Per-step data travels as numpy arrays (columnar), never as per-token objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from dvp_schemas import EngineCapabilities, FinishReason, PruningRule


@dataclass(frozen=True)
class EngineParams:
    """Everything an engine needs to decode one rollout (built by ``params.py``)."""

    temperature: float
    max_tokens: int
    rule: PruningRule
    seed: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_safe_token_ids: bool = False


@dataclass
class RolloutChunk:
    """Tokens decoded for one rollout since its previous chunk (arrays of length t).

    ``safe_ids`` / ``safe_offsets`` are CSR over these t steps (offsets length
    t + 1, starting at 0) when safe ids were asked for, else None; a step whose set is
    the whole vocabulary (``safe_sizes == V``) may list its V ids or leave its row
    empty (cheaper; the wire sends a marker either way). ``logprobs`` and
    ``safe_logmass`` hold NaN where the engine cannot give them exactly.
    The last chunk of a rollout has ``finish_reason`` set.
    """

    token_ids: np.ndarray  # int64 (t,)
    logprobs: np.ndarray  # float32 (t,)
    masked_logprobs: np.ndarray  # float32 (t,)
    safe_logmass: np.ndarray  # float32 (t,)
    safe_sizes: np.ndarray  # int64 (t,)
    safe_ids: np.ndarray | None = None  # int32 (sum sizes,)
    safe_offsets: np.ndarray | None = None  # int64 (t + 1,)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    policy_version: int = 0
    error: str | None = None
    #: bool (t,): the sampled token was outside the engine's derived safe set (S
    #: then includes it); None: the engine samples from S exactly (torch).
    outside_safe_set: np.ndarray | None = None
    #: int64 (t,): the weights version that sampled each token (in-flight updates:
    #: ``keep`` / ``recompute``); None: every token is ``policy_version``'s.
    policy_versions: np.ndarray | None = None
    #: int64 (t,): per token, the oldest version whose keys / values its context
    #: holds (the rollout's last prefill); None: ``policy_version``.
    kv_versions: np.ndarray | None = None

    def versions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(policy_versions, kv_versions)``, int64 ``(t,)`` each, filled in."""
        t = len(self.token_ids)
        pv = self.policy_versions
        kv = self.kv_versions
        if pv is None:
            pv = np.full(t, self.policy_version, dtype=np.int64)
        if kv is None:
            kv = pv.copy()
        return pv, kv


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about the served model, reported by ``GET /v1/models``."""

    name: str  # engine name: "torch" | "vllm"
    model_id: str
    dtype: str
    vocab_size: int
    max_model_len: int
    capabilities: EngineCapabilities
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


class EngineError(RuntimeError):
    """The engine failed a rollout (not the request's fault); maps to 503."""


@runtime_checkable
class Engine(Protocol):
    """An async decoding engine. ``start`` / ``shutdown`` run in the app lifespan."""

    info: EngineInfo

    @property
    def policy_version(self) -> int: ...

    @property
    def state(self) -> str:
        """'starting' | 'running' | 'dead'."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: EngineParams
    ) -> AsyncIterator[RolloutChunk]:
        """Decode one rollout, yielding chunks; the last one has finish_reason set.

        Closing the iterator early (client gone) must abort the rollout.
        """
        ...

    async def abort(self, request_id: str) -> None: ...


@runtime_checkable
class WeightLoader(Protocol):
    """Optional engine capability: new weights in place (``POST /v1/weights``).

    ``load_weights`` gets the ``.safetensors`` files of a checkpoint the server
    has checked against the served one (same names and shapes), swaps them in
    between two engine steps, and returns the new ``policy_version``: ``version``
    when given (a fleet names it, so every replica reports the same number), else
    the old one plus one. With ``drain`` / ``abort`` the server calls it only while
    no rollout is running (``admission.py``), so no rollout mixes two versions. An
    engine without it answers ``POST /v1/weights`` with 501.

    In-flight rollouts (``on_inflight`` keep / recompute) continue across the swap:
    each token's chunk says which version sampled it and which version its KV is
    from (:attr:`RolloutChunk.policy_versions`, :attr:`RolloutChunk.kv_versions`);
    ``recompute=True`` prefills every in-flight rollout's context again with the
    new weights before it continues.
    """

    async def load_weights(
        self, weights: Sequence[Path], version: int | None = None, recompute: bool = False
    ) -> int: ...


class PolicyVersion:
    """The served weights' ``policy_version``: 0 at start; each load names the next."""

    def __init__(self) -> None:
        self.value = 0

    def advance(self, version: int | None) -> int:
        """After a load: ``version`` when a fleet names it, else the old one plus one."""
        self.value = self.value + 1 if version is None else version
        return self.value
