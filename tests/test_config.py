"""Every server option is declared once (``config.py``); the CLI, the environment and
Ray Serve's ``args`` are derived from that declaration and cannot drift from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer
from dvp_server import cli
from dvp_server.config import ServerConfig, option, options, parse_value
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _command_params() -> dict[str, list[str]]:
    """The ``serve`` command's options: parameter name -> its flags."""
    command = typer.main.get_command(cli.app)
    return {p.name: [*p.opts, *p.secondary_opts] for p in command.params if p.name}


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    params = _command_params()
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert set(params) == names
    for spec in options():
        assert f"--{spec.flag}" in params[spec.name], spec.name
        assert spec.help and spec.envvar == "DVP_" + spec.flag.upper().replace("-", "_")


def test_a_field_without_option_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Extended(ServerConfig):
        undeclared: int = 3

    import dvp_server.config as config

    original = config.ServerConfig
    config.ServerConfig = Extended  # type: ignore[misc]
    try:
        with pytest.raises(TypeError, match="undeclared"):
            options()
    finally:
        config.ServerConfig = original  # type: ignore[misc]


def test_help_shows_every_flag_with_its_env_var() -> None:
    result = CliRunner().invoke(cli.app, ["--help"], prog_name="dvp-serve", env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for spec in options():
        assert f"--{spec.flag}" in result.output
        assert spec.envvar in result.output


def test_env_vars_and_flags_build_the_same_config() -> None:
    got: list[ServerConfig] = []
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "run", got.append)
        flags = ["--max-batch", "7", "--no-share-prefixes", "--read-timeout", "2.5"]
        assert runner.invoke(cli.app, flags).exit_code == 0
        env = {"DVP_MAX_BATCH": "7", "DVP_SHARE_PREFIXES": "false", "DVP_READ_TIMEOUT": "2.5"}
        assert runner.invoke(cli.app, [], env=env).exit_code == 0
    assert got[0] == got[1]
    assert (got[0].max_batch, got[0].share_prefixes, got[0].read_timeout_s) == (7, False, 2.5)


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("max_batch", "8", 8),
        ("kv_cache_bytes", "none", None),
        ("fast_kernels", "off", False),
        ("weights_root", "/w", Path("/w")),
        ("read_timeout_s", "1.5", 1.5),
    ],
)
def test_ray_serve_args_parse_as_the_option_type(name: str, text: str, value: object) -> None:
    spec = next(s for s in options() if s.name == name)
    assert parse_value(spec, text) == value


def test_parse_value_names_the_option() -> None:
    spec = next(s for s in options() if s.name == "max_batch")
    with pytest.raises(ValueError, match="max_batch"):
        parse_value(spec, "many")


def test_compose_sets_only_declared_env_vars() -> None:
    known = {spec.envvar for spec in options()}
    text = (ROOT / "docker-compose.yml").read_text()
    settings = set(re.findall(r"\bDVP_[A-Z0-9_]+", text))
    compose_only = {"DVP_BIND_ADDRESS", "DVP_MODEL_DIR", "DVP_REPLICAS", "DVP_GPUS_PER_REPLICA"}
    # the image's build inputs (docker/Dockerfile.cpu build arguments), not server flags
    compose_only |= {"DVP_BASE_IMAGE", "DVP_TORCH_INDEX_URL", "DVP_TORCH_WHEELS", "DVP_CA_BUNDLE"}
    assert settings - known - compose_only == set()


def test_option_keeps_a_secret_out_of_repr() -> None:
    assert "api_key" not in repr(ServerConfig(api_key="k"))
    assert option(1, "x").repr
