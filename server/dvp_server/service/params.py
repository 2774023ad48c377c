"""Request -> engine parameters: one pure function, the precedence written down.

For every field of :class:`~dvp_server.engines.base.EngineParams`, the first
source that sets it wins:

=================  =====================================  ===============================
field              request                                server default (``ServerConfig``)
=================  =====================================  ===============================
temperature        ``sampling.temperature``               (schema default 1.0)
max_tokens         ``sampling.max_tokens`` if sent        ``default_max_tokens``, clipped
                                                          to ``max_tokens_cap``
                   then clipped to the context room       (``max_model_len - prompt_len``)
rule               ``pruning``                            (schema default: no pruning)
seed               derived from (``sampling.seed``, j)    derived from (a random seed
                                                          drawn once per request, j)
stop, stop ids     ``sampling.stop``/``stop_token_ids``   none
ignore_eos         ``sampling.ignore_eos``                False
safe ids           ``return_safe_token_ids``              False
=================  =====================================  ===============================

Seeds: sample j of a prompt uses the generator seed
``SeedSequence([request_seed, j]).generate_state(1, uint64)[0] mod 2**63``. It
depends on the request seed and j only, never on the prompt's position in the
batch, so the same prompt gives the same samples wherever it stands (and two
copies of a prompt in one request give the same samples: ask for ``n`` instead).
An unseeded request gets a random request seed (:func:`draw_request_seed`), which
the response echoes in every rollout's ``seed`` so the request can be replayed.

Limits (max_tokens cap, n, prompt length, vocabulary) are checked by the serving
layer before this function runs; it assumes a valid request.
"""

from __future__ import annotations

import secrets

import numpy as np
from dvp_schemas import PruningRule, RolloutRequest

from ..config import ServerConfig
from ..engines.base import EngineParams

__all__ = [
    "SEED_BITS",
    "draw_request_seed",
    "effective_rule",
    "request_seed_of",
    "sample_seed",
    "to_engine_params",
]

SEED_BITS = 63  # seeds are non-negative int64 values (torch, numpy and vLLM all take them)


def draw_request_seed() -> int:
    """A fresh random request seed in ``[0, 2**63)`` for an unseeded request."""
    return secrets.randbits(SEED_BITS)


def sample_seed(request_seed: int, sample_index: int) -> int:
    """The generator seed of sample ``sample_index`` of a request seeded ``request_seed``.

    Formula: ``SeedSequence([request_seed, sample_index]).generate_state(1, uint64)[0]``
    with the top bit cleared, an int in ``[0, 2**63)``. SeedSequence hashes its
    entropy, so nearby (seed, j) pairs give unrelated generator states.

    Raises:
        ValueError: a negative seed or index.
    """
    if request_seed < 0 or sample_index < 0:
        raise ValueError(
            f"seed and sample_index must be >= 0, got seed={request_seed}, "
            f"sample_index={sample_index}"
        )
    state = np.random.SeedSequence([request_seed, sample_index]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << SEED_BITS) - 1)


def to_engine_params(
    request: RolloutRequest,
    sample_index: int,
    config: ServerConfig,
    *,
    fallback_seed: int | None = None,
    context_room: int | None = None,
) -> EngineParams:
    """Engine parameters of sample ``sample_index`` of every prompt of ``request``.

    Args:
        request: a validated rollout request.
        sample_index: j in ``0..n-1``.
        config: the server defaults.
        fallback_seed: the request seed to use when the request sets none (draw it
            once per request with :func:`draw_request_seed`).
        context_room: new tokens the context has room for
            (``max_model_len - prompt_len``); None: no clip.

    Returns:
        The :class:`EngineParams` (see the module docstring for the precedence).

    Raises:
        ValueError: the request has no seed and no ``fallback_seed`` was given, or
            ``context_room < 1``.
    """
    sampling = request.sampling
    request_seed = sampling.seed if sampling.seed is not None else fallback_seed
    if request_seed is None:
        raise ValueError("an unseeded request needs a fallback_seed (draw_request_seed())")
    if "max_tokens" in sampling.model_fields_set:
        max_tokens = sampling.max_tokens
    else:
        max_tokens = min(config.default_max_tokens, config.max_tokens_cap)
    if context_room is not None:
        if context_room < 1:
            raise ValueError(f"context_room must be >= 1, got {context_room}")
        max_tokens = min(max_tokens, context_room)
    return EngineParams(
        temperature=sampling.temperature,
        max_tokens=max_tokens,
        rule=request.pruning,
        seed=sample_seed(request_seed, sample_index),
        stop=tuple(sampling.stop or ()),
        stop_token_ids=tuple(sampling.stop_token_ids or ()),
        ignore_eos=sampling.ignore_eos,
        return_safe_token_ids=request.return_safe_token_ids,
    )


def request_seed_of(request: RolloutRequest, fallback_seed: int) -> int:
    """The request seed echoed in every rollout: the request's own, else the fallback."""
    return request.sampling.seed if request.sampling.seed is not None else fallback_seed


def effective_rule(rule: PruningRule, max_top_k: int | None) -> PruningRule:
    """The rule as an engine that describes at most ``max_top_k`` tokens per step serves it.

    The vLLM engine derives safe sets from the top-K log-probs (K =
    ``--max-logprobs``), exact only when S lies inside them: a rule without
    ``top_k`` is served with ``top_k = K`` (the response echoes it), a rule with a
    larger ``top_k`` is refused. ``max_top_k`` None (torch engine): unchanged.

    Raises:
        ValueError: ``rule.top_k > max_top_k``.
    """
    if max_top_k is None:
        return rule
    if rule.top_k is None:
        return rule.model_copy(update={"top_k": max_top_k})
    if rule.top_k > max_top_k:
        raise ValueError(
            f"top_k={rule.top_k} is over this engine's limit {max_top_k}: safe sets are "
            f"derived from the top-{max_top_k} log-probs (serve with --max-logprobs "
            f"{rule.top_k} to allow it)"
        )
    return rule
