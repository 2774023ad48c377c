"""Request -> engine parameters (``dvp_server.service.params``) and the server config."""

from __future__ import annotations

import numpy as np
import pytest
from dvp_schemas import PruningRule, RolloutRequest
from dvp_server.config import ServerConfig
from dvp_server.service.params import (
    SEED_BITS,
    draw_request_seed,
    request_seed_of,
    sample_seed,
    to_engine_params,
)


def _request(**kw: object) -> RolloutRequest:
    return RolloutRequest.model_validate({"prompts": ["hi"], **kw})


def test_fields_copied_from_the_request() -> None:
    req = _request(
        n=3,
        sampling={
            "temperature": 0.7,
            "max_tokens": 17,
            "stop": ["\n\n", "END"],
            "stop_token_ids": [5, 9],
            "seed": 11,
            "ignore_eos": True,
        },
        pruning={"min_p": 0.01, "top_k": 50, "top_p": 0.9},
        return_safe_token_ids=True,
    )
    p = to_engine_params(req, 2, ServerConfig())
    assert p.temperature == 0.7
    assert p.max_tokens == 17
    assert p.rule == PruningRule(min_p=0.01, top_k=50, top_p=0.9)
    assert p.stop == ("\n\n", "END")
    assert p.stop_token_ids == (5, 9)
    assert p.ignore_eos is True
    assert p.return_safe_token_ids is True
    assert p.seed == sample_seed(11, 2)


def test_defaults_when_the_request_sets_nothing() -> None:
    p = to_engine_params(_request(), 0, ServerConfig(), fallback_seed=3)
    assert p.temperature == 1.0
    assert p.rule == PruningRule()
    assert p.stop == () and p.stop_token_ids == ()
    assert p.ignore_eos is False and p.return_safe_token_ids is False


@pytest.mark.parametrize(
    ("sent", "default", "cap", "room", "expected"),
    [
        (None, 100, 1000, None, 100),  # server default
        (None, 500, 300, None, 300),  # server default clipped to the cap
        (40, 100, 1000, None, 40),  # the request wins
        (256, 100, 1000, None, 256),  # ... even when it equals the schema default
        (40, 100, 1000, 25, 25),  # clipped to the context room
        (None, 100, 1000, 7, 7),
    ],
)
def test_max_tokens_precedence(
    sent: int | None, default: int, cap: int, room: int | None, expected: int
) -> None:
    sampling = {"seed": 0} if sent is None else {"seed": 0, "max_tokens": sent}
    cfg = ServerConfig(default_max_tokens=default, max_tokens_cap=cap)
    p = to_engine_params(_request(sampling=sampling), 0, cfg, context_room=room)
    assert p.max_tokens == expected


def test_context_room_must_leave_one_token() -> None:
    with pytest.raises(ValueError, match="context_room"):
        to_engine_params(_request(sampling={"seed": 1}), 0, ServerConfig(), context_room=0)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1])
def test_sample_seed_is_seedsequence_of_seed_and_index(seed: int) -> None:
    for j in range(5):
        want = int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0])
        assert sample_seed(seed, j) == want & (2**SEED_BITS - 1)
        assert 0 <= sample_seed(seed, j) < 2**63


def test_sample_seeds_are_distinct_and_deterministic() -> None:
    seeds = {sample_seed(s, j) for s in range(50) for j in range(40)}
    assert len(seeds) == 50 * 40  # no collisions between nearby (seed, j)
    assert sample_seed(7, 3) == sample_seed(7, 3)
    with pytest.raises(ValueError, match="sample_index"):
        sample_seed(1, -1)


def test_seed_does_not_depend_on_the_prompt_position() -> None:
    a = _request(prompts=["x", "y"], n=2, sampling={"seed": 5})
    b = _request(prompts=["y", "x", "z"], n=2, sampling={"seed": 5})
    for j in range(2):
        assert to_engine_params(a, j, ServerConfig()) == to_engine_params(b, j, ServerConfig())
    assert (
        to_engine_params(a, 0, ServerConfig()).seed != to_engine_params(a, 1, ServerConfig()).seed
    )


def test_unseeded_request_uses_the_fallback_seed() -> None:
    req = _request()
    with pytest.raises(ValueError, match="fallback_seed"):
        to_engine_params(req, 0, ServerConfig())
    p = to_engine_params(req, 1, ServerConfig(), fallback_seed=99)
    assert p.seed == sample_seed(99, 1)
    assert request_seed_of(req, 99) == 99
    # a request's own seed wins over the fallback
    seeded = _request(sampling={"seed": 4})
    assert to_engine_params(seeded, 1, ServerConfig(), fallback_seed=99).seed == sample_seed(4, 1)
    assert request_seed_of(seeded, 99) == 4


def test_draw_request_seed_is_random_and_in_range() -> None:
    draws = [draw_request_seed() for _ in range(100)]
    assert len(set(draws)) == 100
    assert all(0 <= d < 2**63 for d in draws)
    assert max(draws) > 2**60  # uses the high bits too (fails with prob. 2**-300)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"engine": "tgi"}, "engine"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_tokens_cap": -1}, "max_tokens_cap"),
        ({"max_n": 0}, "max_n"),
        ({"max_rollouts_per_request": 0}, "max_rollouts_per_request"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"port": 70000}, "port"),
        ({"log_level": "loud"}, "log_level"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_valid_and_frozen() -> None:
    cfg = ServerConfig()
    assert cfg.dtype == "float32" and cfg.host == "127.0.0.1" and cfg.engine == "auto"
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]
