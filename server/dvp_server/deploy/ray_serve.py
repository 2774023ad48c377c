"""dvp-serve as a Ray Serve application: the same API through Serve's proxy.

    ray start --head                          # or an existing cluster
    serve deploy deploy/ray/serve.yaml        # or: serve run deploy/ray/serve.yaml

Import path ``dvp_server.deploy.ray_serve:build_app``; its ``args`` are
:class:`~dvp_server.config.ServerConfig` fields (engine, model, dtype, limits,
``weights_root``, ...), the same settings as ``dvp-serve``'s flags. Each replica
of the deployment :class:`DvpServe` runs :func:`~dvp_server.api.app.create_app`
with its own engine; Serve places the replicas (``ray_actor_options``: CPUs for
the torch engine, GPUs = ``tensor_parallel_size`` for vLLM), routes requests,
restarts a replica whose health check fails, and scales them.

What is set here, for rollout-sized requests (each overridable in the config):

- ``max_ongoing_requests = 64``: HTTP requests per replica (Serve's default, 5,
  counts requests, and one of ours carries up to ``max_rollouts_per_request``
  rollouts); the replica's admission gate (``max_batch + max_queue`` rollouts,
  429 past it) is the real bound.
- ``max_queued_requests = 256``: requests waiting for a replica; past it Serve
  answers 503, which ``dvp_client`` retries (seeded rollouts are safe to repeat).
- ``graceful_shutdown_timeout_s = 300``: a stopping replica finishes its rollouts.
- ``health_check_timeout_s = 60``: the check (``check_health``: the engine
  supervisor's state and the fleet weights, ``fleet.py``) runs on a loop that
  may be busy with large responses.

The fleet's weights come from the deployment's ``user_config`` (``fleet.py``);
``POST /v1/weights`` through the proxy updates every replica (``routes.py``).
"""

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from ..api.app import create_app
from ..config import ServerConfig, options, parse_value
from .fleet import FleetReplica
from .routes import install_fleet

__all__ = ["DEPLOYMENT", "DvpServe", "build_app", "server_config"]

logger = logging.getLogger(__name__)

DEPLOYMENT = "DvpServe"


def server_config(args: dict[str, Any]) -> ServerConfig:
    """The :class:`ServerConfig` of an application's ``args`` (its field names).

    Strings (``serve run ... key=value``) are parsed as the option's type
    (:func:`~dvp_server.config.parse_value`); ``host`` and ``port`` are Serve's (its
    proxy) and ignored.

    Raises:
        ValueError: an unknown field, or a value the field refuses (named).
    """
    specs = {spec.name: spec for spec in options()}
    unknown = sorted(set(args) - set(specs))
    if unknown:
        raise ValueError(f"args: unknown ServerConfig field(s) {unknown}")
    values = {k: parse_value(specs[k], v) for k, v in args.items() if k not in ("host", "port")}
    return ServerConfig(**values)


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=64,
    max_queued_requests=256,
    graceful_shutdown_timeout_s=300,
    health_check_period_s=10,
    health_check_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress()
class DvpServe:
    """One dvp-serve replica: the app over its own engine, in the fleet's weights.

    Args:
        args: :class:`ServerConfig` fields (the application's ``args``).
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self._config = server_config(args)
        ctx = serve.get_replica_context()
        self._fleet = FleetReplica(ctx.app_name, ctx.deployment, ctx.replica_id.unique_id)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app Serve runs (its lifespan builds the engine); ``app`` is Serve's name."""
        served = create_app(self._config)
        install_fleet(served, self._fleet)
        return served

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve the fleet's weights (at start, and on every ``user_config`` change)."""
        await self._fleet.apply(user_config)

    def check_health(self) -> None:
        """Serve's health check (raises when unhealthy): engine and fleet weights."""
        self._fleet.check_health()

    def __del__(self) -> None:
        try:
            self._fleet.forget()
        except Exception:  # shutting down: the entry is ignored once the replica is gone
            logger.debug("could not remove the replica's fleet entry", exc_info=True)


def build_app(args: dict[str, Any]) -> Application:
    """The application for ``serve run`` / ``serve deploy`` (``import_path``).

    Args:
        args: :class:`ServerConfig` fields; checked here, before any replica starts.
    """
    server_config(args)
    return DvpServe.bind(dict(args))  # type: ignore[attr-defined, no-any-return]
