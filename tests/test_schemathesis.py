"""schemathesis over ``/openapi.json`` of a real tiny-model server: no 5xx, ever.

Every operation of the published schema gets generated requests, both ones
that fit the schema (positive) and ones that break it (negative: wrong types,
missing fields, out-of-range values); a response with a status >= 500 fails.
The server has tight limits (4 new tokens, n <= 2, 4 rollouts, 64 KB bodies)
so that the requests that are served are quick, and a weights root with no
usable weights (path loads answer 4xx). CI-sized: a bounded number of
examples per operation, no shrinking.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dvp_server.config import ServerConfig

schemathesis = pytest.importorskip("schemathesis")
from _ops import own_server  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

MAX_EXAMPLES = 40  # per operation and mode; ~1-2 min for the whole file on 2 busy cores


def _published_schema() -> dict[str, Any]:
    """The app's OpenAPI document, built without starting it (the routes are static);
    ``test_live_schema_is_the_one_tested`` checks the live server serves the same."""
    from dvp_server.api.app import create_app

    return create_app(ServerConfig(engine="torch")).openapi()


CONFIG = SchemathesisConfig.from_dict({"generation": {"mode": "all", "max-examples": MAX_EXAMPLES}})
schema = schemathesis.openapi.from_dict(_published_schema(), config=CONFIG)


@pytest.fixture(scope="module")
def st_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("st-weights")
    (root / "junk.safetensors").write_bytes(b"\x00" * 16)
    with own_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("st-server"),
        "--max-batch", "4",
        "--max-tokens-cap", "4",
        "--default-max-tokens", "4",
        "--max-n", "2",
        "--max-rollouts", "4",
        "--max-request-bytes", str(64 << 10),
        "--weights-root", str(root),
        "--log-level", "warning",
    ) as server:  # fmt: skip
        yield server.base_url


def test_live_schema_is_the_one_tested(st_server: str) -> None:
    live = httpx.get(f"{st_server}/openapi.json", timeout=60).json()
    assert live == _published_schema()
    assert {"/v1/rollouts", "/v1/weights", "/v1/weights/upload", "/metrics"} <= set(live["paths"])


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its curl
    database=None,
)
def test_no_request_gets_a_5xx(case: Any, st_server: str) -> None:
    response = case.call(base_url=st_server, timeout=120)
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
        f"{case.as_curl_command()}"
    )
