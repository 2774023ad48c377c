"""dvp-serve as a Ray Serve application: 2 replicas of the tiny model behind Serve's proxy.

One local Ray (2 CPUs, no dashboard) and one application deployed from a config,
as ``serve run deploy/ray/serve.yaml`` does; the scenario runs in order in one
test (Ray's start is the expensive part): requests spread over both replicas; a
fleet weight update with rollouts in flight; a replica killed and back at the
fleet's version; Serve's own 503s (its queue full) retried by ``dvp_client``. A
second test on the same application: a fleet update with ``on_inflight: "keep"``
(each replica swaps in place, nothing drained) while long rollouts decode.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import free_port
from dvp_client import APIStatusError, Client
from safetensors.torch import load_file, save_file

pytest.importorskip("ray.serve")

pytestmark = pytest.mark.ray
CONFIG_FILE = Path(__file__).parent.parent / "deploy" / "ray" / "serve.yaml"

APP, DEPLOYMENT = "dvp", "DvpServe"
TOKEN = 7  # certain at every step under the new weights
START_TIMEOUT_S = 300.0  # Ray + 2 replicas on 2 busy cores
ROLLOUT = {"prompts": [[1, 2, 3]], "n": 2, "sampling": {"max_tokens": 6, "seed": 1}}


def certain_weights(model_dir: Path, token: int) -> dict[str, torch.Tensor]:
    """The tiny model's tensors, changed so that ``token`` is certain at every step."""
    sd = load_file(str(model_dir / "model.safetensors"))
    for name, t in sd.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name] = torch.zeros_like(t)  # the layers add nothing: h = embedding
    sd["model.embed_tokens.weight"] = torch.ones_like(sd["model.embed_tokens.weight"])
    head = torch.zeros_like(sd["lm_head.weight"])
    head[token] = 1.0
    sd["lm_head.weight"] = head
    return sd


def _app_config(tiny_dir: Path, root: Path) -> dict[str, Any]:
    args = {
        "model": str(tiny_dir),
        "engine": "torch",
        "threads": 1,
        "max_batch": 8,
        "max_queue": 64,
        "max_rollouts_per_request": 16,
        "weights_root": str(root),
        "engine_restarts": 0,
    }
    deployment = {
        "name": DEPLOYMENT,
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 0.5},
        # small on purpose: 2 replicas x 2 + 2 queued, so a burst meets Serve's 503
        "max_ongoing_requests": 2,
        "max_queued_requests": 2,
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": 5,
        "user_config": {"weights": None},
    }
    return {
        "name": APP,
        "route_prefix": "/",
        "import_path": "dvp_server.deploy.ray_serve:build_app",
        "args": args,
        "deployments": [deployment],
    }


def _fleet(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/fleet", timeout=30)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def _wait_converged(url: str, version: int, timeout: float) -> dict[str, Any]:
    """The fleet once it serves ``version`` on 2 replicas."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = _fleet(url)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            ids = {r["replica"] for r in last["replicas"]}
            if last["converged"] and last["policy_version"] == version and len(ids) == 2:
                return last
        time.sleep(1.0)
    raise AssertionError(f"the fleet did not converge at {version}: {last}")


@pytest.fixture(scope="module")
def serve_url(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serve's proxy URL, the application deployed from its config and serving."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    root = tmp_path_factory.mktemp("fleet-weights")
    (root / "certain").mkdir()
    save_file(certain_weights(tiny_dir, TOKEN), str(root / "certain" / "model.safetensors"))
    bad = load_file(str(tiny_dir / "model.safetensors"))
    bad["model.norm.weight"] = torch.ones(3)  # a shape the replicas refuse (422 each)
    save_file(bad, str(root / "bad-shape.safetensors"))
    for attempt in (1, 2):  # on a busy machine the raylet can miss Ray's fixed 30 s start
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"applications": [_app_config(tiny_dir, root)]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        url = f"http://127.0.0.1:{port}"
        _wait_converged(url, 0, START_TIMEOUT_S)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_pid(replica: str) -> int:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"][DEPLOYMENT]["replicas"]
    return next(int(r["pid"]) for r in replicas if r["replica_id"] == replica)


class Traffic:
    """Threads posting rollouts through the proxy; records (replica, versions) in order."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.seen: dict[str, list[int]] = defaultdict(list)  # replica -> versions, in order
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                r = http.post(f"{self.url}/v1/rollouts", json=ROLLOUT)
                if r.status_code != 200:
                    with self._lock:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                    time.sleep(0.2)
                    continue
                versions = {ro["policy_version"] for ro in r.json()["rollouts"]}
                with self._lock:
                    self.errors += [f"mixed versions {versions}"] if len(versions) > 1 else []
                    self.seen[r.headers["x-dvp-replica"]].append(versions.pop())


def test_config_file() -> None:
    """deploy/ray/serve.yaml is a valid Serve config whose args make a ServerConfig."""
    import yaml
    from dvp_server.deploy.ray_serve import DEPLOYMENT, server_config
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG_FILE.read_text()))
    [app] = config.applications
    assert app.import_path == "dvp_server.deploy.ray_serve:build_app"
    assert server_config(app.args).engine == "vllm"
    [deployment] = app.deployments
    assert deployment.name == DEPLOYMENT and deployment.user_config == {"weights": None}
    assert deployment.max_ongoing_requests == 64
    with pytest.raises(ValueError, match="max_batchh"):
        server_config({"max_batchh": 3})
    assert server_config({"threads": "2", "weights_root": "/ckpt"}).threads == 2


@pytest.mark.slow
def test_fleet_on_ray_serve(serve_url: str) -> None:
    """Spread, fleet update in flight, a failed one rolled back, a killed replica back at
    N, Serve's 503s retried."""
    url = serve_url
    client = Client(url, max_retries=8)
    start = _fleet(url)
    assert start["policy_version"] == 0 and len(start["replicas"]) == 2

    # 1. the same API through Serve's proxy, spread over both replicas
    with httpx.Client(timeout=60) as http:
        hits = {http.post(f"{url}/v1/rollouts", json=ROLLOUT).headers["x-dvp-replica"]}
        for _ in range(20):
            if len(hits) == 2:
                break
            hits.add(http.post(f"{url}/v1/rollouts", json=ROLLOUT).headers["x-dvp-replica"])
        assert hits == {r["replica"] for r in start["replicas"]}
        upload = http.post(f"{url}/v1/weights/upload", content=b"x")
        assert upload.status_code == 409 and upload.json()["error"]["param"] == "body"

    # 2. a fleet update named 5, with rollouts in flight on both replicas
    with Traffic(url, threads=2) as traffic:
        time.sleep(2.0)
        [update] = client.update_weights("certain", policy_version=5)
        time.sleep(2.0)
    assert update.policy_version == 5 and update.previous_version == 0
    assert update.replicas and {r.policy_version for r in update.replicas} == {5}
    assert not traffic.errors, traffic.errors[:5]
    for replica, versions in traffic.seen.items():
        assert versions == sorted(versions), (replica, versions)  # only up, per replica
        assert set(versions) <= {0, 5}
    assert {v[-1] for v in traffic.seen.values()} == {5}  # both replicas serve 5 after
    after = client.rollouts([[1, 2, 3]], n=2, max_tokens=4)
    assert all(r.policy_version == 5 for r in after.rollouts)
    assert all(set(r.token_ids) == {TOKEN} for r in after.rollouts)  # the new weights
    with pytest.raises(Exception, match="policy_version"):
        client.update_weights("certain", policy_version=5)  # not above the fleet's: 422
    assert _fleet(url)["policy_version"] == 5

    # 2b. an update every replica refuses: reported, the fleet's config put back at 5
    with pytest.raises(APIStatusError) as failed:
        client.update_weights("bad-shape.safetensors", policy_version=6)
    assert failed.value.status_code == 502
    assert "model.norm.weight" in str(failed.value) and "back at the previous" in str(failed.value)
    back = _wait_converged(url, 5, START_TIMEOUT_S)
    assert {r["policy_version"] for r in back["replicas"]} == {5}

    # 3. a replica killed: Serve starts another, which loads version 5 before serving
    victim = back["replicas"][0]["replica"]
    os.kill(_replica_pid(victim), signal.SIGKILL)
    ok = 0
    while True:  # seeded rollouts, retried by dvp_client through the replica's death
        batch = client.rollouts([[1, 2, 3]], n=2, max_tokens=4)
        assert {r.policy_version for r in batch.rollouts} == {5}
        ok += 1
        fleet = _fleet(url)
        ids = {r["replica"] for r in fleet["replicas"]}
        if fleet["converged"] and len(ids) == 2 and victim not in ids:
            break
        assert ok < 2000, fleet
    assert {r["policy_version"] for r in fleet["replicas"]} == {5}
    (newcomer,) = {r["replica"] for r in fleet["replicas"]} - {
        r["replica"] for r in back["replicas"]
    }
    with httpx.Client(timeout=60) as http:
        for _ in range(40):
            r = http.post(f"{url}/v1/rollouts", json=ROLLOUT)
            if r.headers.get("x-dvp-replica") == newcomer:
                break
        assert r.headers["x-dvp-replica"] == newcomer
        assert {ro["policy_version"] for ro in r.json()["rollouts"]} == {5}

    # 4. a burst past Serve's queue: raw 503s from Serve, none through dvp_client
    def raw(_: int) -> int:
        return httpx.post(f"{url}/v1/rollouts", json=ROLLOUT, timeout=60).status_code

    def retried(_: int) -> int:
        return len(client.rollouts([[1, 2, 3]], n=2, max_tokens=6).rollouts)

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(raw, range(12)))
    assert 503 in codes and set(codes) <= {200, 503}, codes
    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(retried, range(12))) == [2] * 12


@pytest.mark.slow
def test_fleet_keep_update_in_flight(serve_url: str) -> None:
    """A fleet update with ``on_inflight: "keep"`` while long rollouts decode on both
    replicas: nothing drained or aborted or lost, every rollout's spans go from the old
    to the new version with the KV of its prefill throughout, and some rollout was
    decoding when the update landed (spans of both versions; up to 3 tries, each a new
    version, since on a fast machine 400 tokens may all decode before the update lands);
    every replica serves the new version when the call returns."""
    url = serve_url
    body = {
        "prompts": [[1, 2, 3]],
        "n": 8,  # a full batch per request (max_batch 8): decoding lasts long enough
        "sampling": {"max_tokens": 400, "seed": 3, "ignore_eos": True},
    }

    def post(_: int) -> httpx.Response:
        while True:  # Serve's router may queue past its small limit: retry its 503
            r = httpx.post(f"{url}/v1/rollouts", json=body, timeout=300)
            if r.status_code != 503:
                return r
            time.sleep(0.2)

    spanned, tries = 0, []
    while not spanned and len(tries) < 3:
        old = _fleet(url)["policy_version"]
        new = old + 1
        with ThreadPoolExecutor(4) as pool:  # 2 per replica: Serve's max_ongoing_requests
            futures = [pool.submit(post, i) for i in range(4)]
            time.sleep(0.3)
            [update] = Client(url, max_retries=0).update_weights(
                "certain", policy_version=new, on_inflight="keep"
            )
            done = [f.result() for f in futures]
        assert update.policy_version == new and update.previous_version == old
        assert update.drained_rollouts == 0 and update.aborted_rollouts == 0
        assert update.replicas and {r.policy_version for r in update.replicas} == {new}
        assert len(update.replicas) == 2
        for r in done:
            assert r.status_code == 200, r.text
            for ro in r.json()["rollouts"]:
                assert len(ro["token_ids"]) == 400  # no token lost
                spans = ro["version_spans"]
                pvs = [s[1] for s in spans]
                assert pvs in ([old], [new], [old, new]), spans
                # keep: the prefill's KV throughout (a request queued past the update,
                # by Serve or by the engine's batch, was prefilled by the new weights)
                assert all(kv == spans[0][1] for _, _, kv in spans), spans
                spanned += pvs == [old, new]
        tries.append(
            sorted(
                {
                    tuple(s[1] for s in ro["version_spans"])
                    for r in done
                    for ro in r.json()["rollouts"]
                }
            )
        )
    assert spanned, tries
    fleet = _wait_converged(url, new, 60)
    assert {r["policy_version"] for r in fleet["replicas"]} == {new}
