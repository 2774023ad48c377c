"""``dvp-serve``: serve safe-vocabulary rollouts over HTTP (typer + uvicorn).

dvp-serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
dvp-serve --model ./my-model --port 9000   # a transformers directory
DVP_MAX_BATCH=64 dvp-serve                 # every flag also as DVP_<FLAG>
python -m dvp_server --help

Every flag is built from its :class:`~dvp_server.config.ServerConfig` field
(:func:`~dvp_server.config.options`): nothing here names an option.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import typer

from .config import ServerConfig, options

__all__ = ["app", "main", "serve"]

app = typer.Typer(
    add_completion=False,
    help="Serve LLM rollouts with Dynamic Vocabulary Pruning metadata (POST /v1/rollouts).",
)


def serve(**values: Any) -> None:
    """Serve POST /v1/rollouts, GET /v1/models and GET /health (OpenAPI: /openapi.json)."""
    if isinstance(values.get("log_level"), str):
        values["log_level"] = values["log_level"].lower()
    try:
        config = ServerConfig(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run(config)


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """``serve``'s parameters: one typer option per :func:`options` entry."""
    params, annotations = [], {}
    for spec in options():
        kind: Any = spec.type | None if spec.optional else spec.type
        decls = [f"--{spec.flag}/--no-{spec.flag}"] if spec.type is bool else [f"--{spec.flag}"]
        default = typer.Option(
            spec.default,
            *decls,
            envvar=spec.envvar,
            show_envvar=True,
            show_default=not spec.secret and spec.default is not None,
            help=spec.help,
        )
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default))
        params[-1] = params[-1].replace(annotation=kind)
        annotations[spec.name] = kind
    return inspect.Signature(params, return_annotation=None), annotations


serve.__signature__, serve.__annotations__ = _signature()  # type: ignore[attr-defined]
app.command()(serve)


def run(config: ServerConfig) -> None:
    """Run uvicorn with the app until SIGTERM / SIGINT, then drain and exit 0 (blocking)."""
    from .api.app import create_app
    from .api.server import serve as serve_gracefully

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve_gracefully(create_app(config), config)


def main() -> None:
    """Console-script entry point (``dvp-serve``)."""
    app(prog_name="dvp-serve")
