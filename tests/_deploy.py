"""Static checks of docker-compose.yml and docker/Dockerfile.* (no docker daemon needed).

Used by tests/test_deploy.py. Each ``*_problems`` function returns a list of
human-readable problems (empty: fine), so a test can assert both that the real
files pass and that a broken copy fails.

- :func:`interpolate` applies Compose's variable interpolation (``${VAR:-default}``
  and friends, ``$$``) the way ``docker compose config`` does before validating.
- :func:`compose_schema` is the Compose Specification JSON schema vendored in the
  PyPI package ``check-jsonschema`` (``vendor.compose-spec``); nothing is fetched.
- :func:`parse_dockerfile` is a line parser: continuations joined, comments dropped.
- :func:`dockerignore_excluded` matches ``.dockerignore`` patterns (``*``, ``**``,
  ``?``, ``!`` exceptions, the last match wins, a directory excludes its contents).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_VAR = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<bad>\{))"
)
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.IGNORECASE)
_ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-|:?\?[^}]*)?\}$")
_HEALTH_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):(?P<port>\d+)(?P<path>/[^'\"\s)]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of every string in ``value`` (dicts, lists, scalars).

    ``${VAR}``, ``$VAR``; ``${VAR:-d}`` (d when unset or empty), ``${VAR-d}`` (when
    unset); ``${VAR:?e}`` / ``${VAR?e}`` (error); ``${VAR:+a}`` / ``${VAR+a}``; ``$$``
    is a literal ``$``. Unset variables without a default become "".

    Raises:
        ValueError: a required variable is missing, or a ``${`` that is no variable.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        if m["bad"]:
            raise ValueError(f"invalid interpolation in {value!r}")
        name = m["braced"] or m["bare"]
        got, op, arg = env.get(name), m["op"], m["arg"] or ""
        present = got is not None and (got != "" or not (op or "").startswith(":"))
        if op in ("-", ":-"):
            return got if present and got is not None else arg
        if op in ("?", ":?"):
            if not present or got is None:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return got
        if op in ("+", ":+"):
            return arg if present else ""
        return got or ""

    return _VAR.sub(one, value)


def compose_schema() -> dict[str, Any]:
    """The Compose Specification JSON schema that ``check-jsonschema`` vendors."""
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((files / "compose-spec.json").read_text())
    return schema


@functools.cache
def _compose_validator() -> Any:
    """A validator for :func:`compose_schema` (its draft, the schema itself checked once)."""
    from jsonschema.validators import validator_for

    schema = compose_schema()
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_problems(doc: Any) -> list[str]:
    """Violations of the Compose Specification schema, as ``path: message`` lines."""
    errors = sorted(_compose_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its argument text, first line."""

    cmd: str
    args: str
    line: int

    def words(self) -> list[str]:
        """Exec (JSON array) form parsed as JSON, shell form split like a shell."""
        text = self.args.strip()
        if text.startswith("["):
            parsed: list[str] = json.loads(text)
            return parsed
        return shlex.split(text)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: ``\\`` continuations joined, comment lines dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = no
        cont = line.endswith("\\")
        buf.append(line[:-1] if cont else line)
        if not cont:
            cmd, _, args = " ".join(buf).partition(" ")
            out.append(Instruction(cmd.upper(), args.strip(), start))
            buf = []
    if buf:
        raise ValueError(f"line {start}: instruction continued past the end of the file")
    return out


def copy_sources(inst: Instruction) -> list[str]:
    """Context paths a COPY/ADD reads (none for ``--from=`` copies between stages)."""
    words = inst.words()
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []
    return [w for w in words if not w.startswith("--")][:-1]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as a regex (Go filepath.Match plus ``**``)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out[:-2] + "(?:.*/)?", i + 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excluded(path: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` ``patterns`` keep ``path`` (relative) out of the context."""
    parts = Path(path).parts
    excluded = False
    for raw in patterns:
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        rx = _glob_regex(str(Path(pat.lstrip("!").strip().lstrip("/"))))
        hit = any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1))
        if hit:
            excluded = not negate
    return excluded


def served_routes() -> tuple[set[str], frozenset[str]]:
    """Paths the real app serves (``create_app``) and those open without an API key."""
    from dvp_server.api.app import create_app
    from dvp_server.api.auth import OPEN_PATHS
    from dvp_server.config import ServerConfig

    app = create_app(ServerConfig())
    return {str(getattr(r, "path", "")) for r in app.routes}, OPEN_PATHS


def healthcheck_problems(
    where: str,
    test: list[str] | str,
    port: int | None,
    routes: set[str],
    open_paths: frozenset[str],
) -> list[str]:
    """A health check must GET a route the app serves, open without a key, on its port."""
    text = test if isinstance(test, str) else " ".join(test)
    m = _HEALTH_URL.search(text)
    if m is None:
        return [f"{where}: health check {text!r} requests no http://127.0.0.1:<port>/ URL"]
    problems = []
    if m["path"] not in routes:
        problems.append(f"{where}: health check path {m['path']} is not served by the app")
    elif m["path"] not in open_paths:
        problems.append(f"{where}: health check path {m['path']} needs the API key (401)")
    if port is not None and int(m["port"]) != port:
        problems.append(f"{where}: health check port {m['port']} is not the served port {port}")
    return problems


def env_readers() -> dict[str, str]:
    """Source text of what reads the environment in the images: dvp_server, vLLM, HF hub."""
    from dvp_server.config import options

    texts = {"dvp_server": " ".join(f'"{spec.envvar}"' for spec in options())}  # DVP_<FLAG>
    for f in sorted((ROOT / "server" / "dvp_server").rglob("*.py")):
        texts["dvp_server"] += f.read_text()
    for pkg, rel in (("vllm", "envs.py"), ("huggingface_hub", "constants.py")):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin is not None:
            texts[pkg] = (Path(spec.origin).parent / rel).read_text()
    return texts


def env_name_problems(where: str, names: list[str], readers: dict[str, str]) -> list[str]:
    """Every variable name must be read by dvp_server, vLLM or huggingface_hub (or Python/pip)."""
    problems = []
    for name in names:
        if name.startswith(("PYTHON", "PIP_")) or name == "HOME":
            continue
        if not any(f'"{name}"' in text for text in readers.values()):
            problems.append(f"{where}: environment variable {name} is read by nothing served")
    return problems


def secret_problems(where: str, env: Mapping[str, Any], command: list[str]) -> list[str]:
    """Secrets only as ``${VAR}`` references (empty default at most), never on the command."""
    problems = []
    for name, value in env.items():
        if SECRET_NAME.search(name) and not (value is None or _ENV_REF.match(str(value))):
            problems.append(f"{where}: {name} holds a literal value, not a ${{VAR}} reference")
    problems += [
        f"{where}: a secret on the command line: {a}" for a in command if a.startswith("--api-key")
    ]
    return problems
