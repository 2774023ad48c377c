"""One weight version for a Ray Serve fleet of dvp-serve replicas.

The fleet's weights live in the deployment's ``user_config``, in Serve's stored
application config, not in any replica::

    {"weights": {"path": "step-100", "policy_version": 7}}     # or {"weights": null}

Serve hands it to a running replica through ``reconfigure()`` (in place, no
restart) and to a replica started later (added, or replacing a dead one) right
after its start, before it takes traffic.

Per replica (:class:`FleetReplica`):

1. :meth:`~FleetReplica.apply`: nothing to do when it serves that version;
   else ``WeightManager.update_from_path`` with ``policy_version`` set, so the
   engine serves the files *as* that version (drain or abort, then the swap,
   as ``POST /v1/weights`` does on one server).
2. the outcome (version served, source, error) goes to Ray's internal KV store
   under ``<app>/<deployment>/<replica id>`` in namespace :data:`NAMESPACE`.
3. a failed load at start fails the replica's start (it never takes traffic);
   a failed in-place load keeps the previous weights (nothing changed), is
   recorded, and fails ``check_health`` from then on, so Serve takes the
   replica out of rotation and starts another. A load that left the engine
   without weights (5xx) fails the reconfigure at once.

The fleet (:meth:`FleetReplica.status`, ``GET /v1/fleet``): Serve's live
replicas of the deployment (the controller's details) joined with the KV
entries; ``converged`` when Serve reports the deployment HEALTHY and every
replica serves the configured version without an error.

A fleet update (:meth:`FleetReplica.update`, ``POST /v1/weights`` through the
proxy): check the path, write the new ``user_config`` into the application's
stored config (what ``serve deploy`` of an edited file does; the application
must have been deployed from a config), then wait until the fleet has
converged, a replica reports a failure, or the timeout passes. On a failure
the previous ``user_config`` is put back (replicas that loaded the new version
then fail their health check and are replaced at the previous one) and the
error names the replicas; on a timeout it names the replicas behind.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dvp_schemas import FleetStatus, ReplicaWeights, WeightsUpdateRequest, WeightsUpdateResponse
from fastapi import FastAPI

from ..errors import ServiceError, validation_error
from ..service.weights import resolve_under_root, weight_files

__all__ = ["NAMESPACE", "FleetReplica", "FleetWeights"]

logger = logging.getLogger(__name__)

NAMESPACE = "dvp-serve"  # Ray internal KV namespace of the replicas' reports
POLL_S = 0.25  # how often a fleet update reads the fleet's state
LOAD_MARGIN_S = 120.0  # a fleet update waits drain_timeout_s + this for every replica
_GONE = frozenset({"STOPPING"})  # replica states left out of the fleet


@dataclass(frozen=True)
class FleetWeights:
    """The fleet's weights: ``user_config["weights"]`` (None: the model's own, version 0)."""

    path: str | None = None
    policy_version: int = 0
    on_inflight: str | None = None
    drain_timeout_s: float | None = None

    @classmethod
    def from_user_config(cls, user_config: Any) -> "FleetWeights":
        """Parse a deployment's ``user_config``.

        Raises:
            ValueError: not ``{"weights": null | {"path", "policy_version", ...}}``.
        """
        if user_config is None:
            return cls()
        if not isinstance(user_config, dict) or set(user_config) - {"weights"}:
            raise ValueError(
                "user_config must be {'weights': null | {'path': str, 'policy_version': int}}, "
                f"got {user_config!r:.200}"
            )
        weights = user_config.get("weights")
        if weights is None:
            return cls()
        try:
            request = WeightsUpdateRequest.model_validate(weights)
        except ValueError as exc:
            raise ValueError(f"user_config.weights: {exc}") from None
        if request.policy_version is None:
            raise ValueError("user_config.weights.policy_version is required")
        return cls(
            request.path, request.policy_version, request.on_inflight, request.drain_timeout_s
        )

    def user_config(self) -> dict[str, Any]:
        """The ``user_config`` that sets these weights."""
        if self.path is None:
            return {"weights": None}
        weights: dict[str, Any] = {"path": self.path, "policy_version": self.policy_version}
        if self.on_inflight is not None:
            weights["on_inflight"] = self.on_inflight
        if self.drain_timeout_s is not None:
            weights["drain_timeout_s"] = self.drain_timeout_s
        return {"weights": weights}

    def request(self) -> WeightsUpdateRequest:
        """The single-server update that loads these weights on one replica."""
        assert self.path is not None
        return WeightsUpdateRequest(
            path=self.path,
            policy_version=self.policy_version,
            on_inflight=self.on_inflight,  # type: ignore[arg-type]
            drain_timeout_s=self.drain_timeout_s,
        )


def _controller() -> Any:
    """The Serve controller's actor handle (from inside a replica)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise ServiceError(503, "fleet_unavailable", "the Serve controller is not reachable")
    return client._controller


def _kv_put(key: str, value: dict[str, Any]) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, json.dumps(value), overwrite=True, namespace=NAMESPACE)


def _kv_read(prefix: str) -> dict[str, dict[str, Any]]:
    """Every report under ``prefix``, by replica id."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out = {}
    for key in _internal_kv_list(prefix, namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            out[key.decode().rsplit("/", 1)[-1]] = json.loads(raw)
    return out


def _kv_del(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=NAMESPACE)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class FleetReplica:
    """The fleet's weights as seen from one replica (see the module docstring).

    Args:
        app_name: the Serve application.
        deployment: the Serve deployment.
        replica_id: this replica's Serve id.
    """

    def __init__(self, app_name: str, deployment: str, replica_id: str) -> None:
        self.app_name = app_name
        self.deployment = deployment
        self.replica_id = replica_id
        self.app: FastAPI | None = None  # the served app, once built
        self.desired = FleetWeights()
        self.error: str | None = None
        self.last_update: dict[str, Any] = {}
        self._applied = False
        self._lock = asyncio.Lock()  # one apply at a time on this replica
        self._update_lock = asyncio.Lock()  # one fleet update at a time from this replica

    @property
    def _prefix(self) -> str:
        return f"{self.app_name}/{self.deployment}/"

    def _state(self) -> Any:
        if self.app is None:
            raise RuntimeError("the replica's app is not built yet")
        return self.app.state

    # ----------------------------------------------------------------- one replica

    async def apply(self, user_config: Any) -> None:
        """Serve the fleet's weights (Serve's ``reconfigure``); see the module docstring.

        Raises:
            ValueError: a malformed ``user_config``.
            RuntimeError: the load failed at start, or left the engine without weights.
        """
        desired = FleetWeights.from_user_config(user_config)
        async with self._lock:
            first, self._applied = not self._applied, True
            self.desired = desired
            fatal = await self._load(desired)
            await asyncio.to_thread(_kv_put, self._prefix + self.replica_id, self.report())
        if self.error is not None and (first or fatal):
            raise RuntimeError(f"replica {self.replica_id}: {self.error}")

    async def _load(self, desired: FleetWeights) -> bool:
        """Load ``desired`` unless served; sets :attr:`error`; whether the engine is broken."""
        state = self._state()
        served = state.engine.policy_version
        self.error = None
        if served == desired.policy_version:
            return False
        if desired.path is None:
            self.error = f"policy_version {served} is served, the fleet's is 0 (no weights)"
            return False
        try:
            response = await state.weights.update_from_path(desired.request())
        except ServiceError as exc:
            self.error = f"policy_version {desired.policy_version}: {exc.status} {exc.message}"
            logger.error("fleet weights failed on replica %s: %s", self.replica_id, self.error)
            return exc.status >= 500
        except Exception as exc:  # the engine's own failure: the reconfigure fails
            self.error = f"policy_version {desired.policy_version}: {type(exc).__name__}: {exc}"
            logger.exception("fleet weights failed on replica %s", self.replica_id)
            return True
        self.last_update = {
            "drained": response.drained_rollouts,
            "aborted": response.aborted_rollouts,
            "kept": response.kept_rollouts,
            "load_s": response.load_s,
            "wait_s": response.wait_s,
        }
        return False

    def report(self) -> dict[str, Any]:
        """This replica's KV entry: what it serves, and its last failure."""
        state = self._state()
        info = state.weights.info()
        return {
            "policy_version": info.policy_version,
            "source": info.source,
            "num_tensors": info.num_tensors,
            "error": self.error,
            "at": _now(),
            **self.last_update,
        }

    def check_health(self) -> None:
        """Serve's health check: the engine (supervisor) and the fleet's weights.

        Raises:
            RuntimeError: the engine is dead for good, or this replica failed to
                load the fleet's weights (it serves another version).
        """
        if self.app is None or not hasattr(self.app.state, "supervisor"):
            return  # still starting: Serve waits for the start itself
        supervisor = self.app.state.supervisor
        if supervisor.state == "dead":
            raise RuntimeError(f"the {supervisor.engine.info.name} engine is dead")
        if self.error is not None:
            raise RuntimeError(f"fleet weights: {self.error}")

    def forget(self) -> None:
        """Remove this replica's KV entry (graceful shutdown)."""
        _kv_del(self._prefix + self.replica_id)

    # ----------------------------------------------------------------- the fleet

    async def _deployment_details(self) -> dict[str, Any]:
        details = await _controller().get_serve_instance_details.remote()
        app = details.get("applications", {}).get(self.app_name)
        if app is None or self.deployment not in app.get("deployments", {}):
            raise ServiceError(503, "fleet_unavailable", "the Serve deployment is not listed")
        return app["deployments"][self.deployment]  # type: ignore[no-any-return]

    async def status(self) -> FleetStatus:
        """``GET /v1/fleet``: the configured version and what every live replica serves."""
        dep = await self._deployment_details()
        desired = FleetWeights.from_user_config(dep["deployment_config"].get("user_config"))
        reports = await asyncio.to_thread(_kv_read, self._prefix)
        replicas = []
        for r in sorted(dep.get("replicas", []), key=lambda r: r["replica_id"]):
            if r["state"] in _GONE:
                continue
            got = reports.get(r["replica_id"], {})
            replicas.append(
                ReplicaWeights(
                    replica=r["replica_id"],
                    state=r["state"],
                    policy_version=got.get("policy_version"),
                    source=got.get("source"),
                    error=got.get("error"),
                )
            )
        converged = (
            dep["status"] == "HEALTHY"
            and bool(replicas)
            and all(
                r.state == "RUNNING" and r.policy_version == desired.policy_version and not r.error
                for r in replicas
            )
        )
        return FleetStatus(
            app=self.app_name,
            deployment=self.deployment,
            status=dep["status"],
            policy_version=desired.policy_version,
            source=None if desired.path is None else f"path:{desired.path}",
            converged=converged,
            replicas=replicas,
        )

    async def update(self, body: WeightsUpdateRequest) -> WeightsUpdateResponse:
        """A fleet update (``POST /v1/weights`` through the proxy); see the module docstring.

        Raises:
            ServiceError: 403 / 422 for the path (nothing changed); 422 for a
                ``policy_version`` not above the fleet's; 409 when the application was
                not deployed from a config; 502 when a replica failed (the fleet's
                config is put back); 504 when replicas were not there in time.
        """
        config = self._state().config
        root = config.weights_root
        target = await asyncio.to_thread(resolve_under_root, root, body.path)
        assert root is not None  # resolve_under_root refuses a missing root
        await asyncio.to_thread(weight_files, target, root)
        async with self._update_lock:
            before = await self.status()
            version = body.policy_version or before.policy_version + 1
            if version <= before.policy_version:
                raise validation_error(
                    "policy_version",
                    f"must be above the fleet's policy_version {before.policy_version}, "
                    f"got {version}",
                )
            new = FleetWeights(
                str(target.relative_to(root.resolve())),
                version,
                body.on_inflight,
                body.drain_timeout_s,
            )
            t0 = time.monotonic()
            previous = await self._set_user_config(new.user_config())
            timeout = (body.drain_timeout_s or config.weights_drain_timeout_s) + LOAD_MARGIN_S
            status = await self._wait(version, previous, t0 + timeout)
            logger.info(
                "fleet weights: policy_version %d on %d replicas in %.2f s",
                version, len(status.replicas), time.monotonic() - t0,
            )  # fmt: skip
            return await self._response(before, status, config)

    async def _wait(self, version: int, previous: Any, deadline: float) -> FleetStatus:
        """Poll the fleet until it serves ``version``; roll back on a failure."""
        while True:
            status = await self.status()
            if status.converged and status.policy_version == version:
                return status
            failed = [r for r in status.replicas if r.error]
            if failed:
                await self._set_user_config(previous)
                raise ServiceError(
                    502,
                    "fleet_update_error",
                    f"weights: policy_version {version} failed on {len(failed)} replica(s) ("
                    + "; ".join(f"{r.replica}: {r.error}" for r in failed)
                    + "); the fleet's config is back at the previous weights",
                )
            if time.monotonic() > deadline:
                behind = [r for r in status.replicas if r.policy_version != version]
                raise ServiceError(
                    504,
                    "fleet_update_timeout",
                    f"weights: policy_version {version} is configured but not yet served by "
                    + ", ".join(f"{r.replica} ({r.state}, {r.policy_version})" for r in behind)
                    + f"; Serve says {status.status}",
                )
            await asyncio.sleep(POLL_S)

    async def _set_user_config(self, user_config: Any) -> Any:
        """Write the deployment's ``user_config`` into the stored config; the previous one.

        Raises:
            ServiceError: 409 when the application was not deployed from a config.
        """
        from ray.serve.schema import ServeDeploySchema

        controller = _controller()
        configs = await controller.get_app_configs.remote()
        if self.app_name not in configs:
            raise ServiceError(
                409,
                "conflict_error",
                "weights: fleet weight updates rewrite the application's config; deploy it "
                "from a config file (serve deploy / serve run deploy/ray/serve.yaml)",
            )
        apps = {name: c.model_dump(exclude_unset=True) for name, c in configs.items()}
        deployments = apps[self.app_name].setdefault("deployments", [])
        entry = next((d for d in deployments if d["name"] == self.deployment), None)
        if entry is None:
            entry = {"name": self.deployment}
            deployments.append(entry)
        previous = entry.get("user_config")
        entry["user_config"] = user_config
        schema = ServeDeploySchema.model_validate({"applications": list(apps.values())})
        await controller.apply_config.remote(schema)
        logger.info("fleet weights: user_config %s (was %s)", user_config, previous)
        return previous

    async def _response(
        self, before: FleetStatus, after: FleetStatus, config: Any
    ) -> WeightsUpdateResponse:
        """The fleet update's answer: the new version, every replica's, and their loads
        (rollouts drained / aborted / kept summed over replicas; the longest hold and
        swap)."""
        info = self._state().weights.info()
        reports = await asyncio.to_thread(_kv_read, self._prefix)
        loads = [reports.get(r.replica, {}) for r in after.replicas]
        return WeightsUpdateResponse(
            policy_version=after.policy_version,
            source=after.source or info.source,
            loaded_at=_now(),
            num_tensors=info.num_tensors,
            on_inflight=config.weights_update_policy,
            previous_version=before.policy_version,
            aborted_rollouts=sum(r.get("aborted", 0) for r in loads),
            drained_rollouts=sum(r.get("drained", 0) for r in loads),
            kept_rollouts=sum(r.get("kept", 0) for r in loads),
            wait_s=max((r.get("wait_s", 0.0) for r in loads), default=0.0),
            load_s=max((r.get("load_s", 0.0) for r in loads), default=0.0),
            replicas=after.replicas,
        )
